"""The causal follow-up on the tiny model: hooks restore the model bitwise, zeroing a whole site is its
bias, a planted unit set is found against matched random sets, and the random draw is seeded and matched."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from otherview import causal, intervention
from otherview.model import architecture
from otherview.plan import build_plan
from otherview.spec import load_spec, parse_spec
from test_capture import _inputs  # the same random transformer inputs

SPECS = Path(__file__).resolve().parent / "specs"
# Two attention units (head 0, channels 4..7 and head 1, channels 16..19) of the single-stream site, at unit
# width 4. Attention units, because there the prompt reaches the target tokens directly; a single-stream
# block's MLP runs beside its attention on the same input, so its channels differ between prompts only
# through the blocks before.
PLANTED = [9, 12]


def _spec_text(width: int = 4) -> str:
    return (SPECS / "pass" / "small.toml").read_text().replace("unit_width = 16", f"unit_width = {width}")


@pytest.fixture(scope="module")
def plan():
    spec, _ = load_spec(SPECS / "pass" / "small.toml")
    return build_plan(spec, architecture("builtin:tiny"))


@pytest.fixture(scope="module")
def fine_plan():
    return build_plan(parse_spec(_spec_text(4)), architecture("builtin:tiny"))


@torch.no_grad()
def test_hooks_change_only_masked_rows_and_restore_bitwise(tiny_pipe, plan):
    transformer = tiny_pipe.transformer
    inputs = _inputs(plan, 2)
    before = transformer(**inputs)[0]
    masks = intervention.channel_masks(plan, [[0, 5, 9], []], "cpu")
    with intervention.attach(transformer, plan, 2, "cpu") as iv:
        iv.set_rows(masks, torch.tensor([0, 1]))
        hooked = transformer(**inputs)[0]
    after = transformer(**inputs)[0]
    assert not torch.equal(hooked[0], before[0]), "zeroing three units changed nothing"
    assert torch.equal(hooked[1], before[1]), "a row with an empty mask was changed"
    assert torch.equal(before, after), "the model differs after the intervention hooks were removed"
    assert not any(m._forward_pre_hooks for m in transformer.modules())


@torch.no_grad()
def test_patching_a_pass_with_its_own_inputs_changes_nothing(tiny_pipe, plan):
    """The patch path end to end (record, gather per row, overwrite): a row patched from itself is unchanged,
    and a row patched from the other row takes that row's inputs at every masked channel."""
    transformer = tiny_pipe.transformer
    inputs = _inputs(plan, 2, seed=2)
    before = transformer(**inputs)[0]
    tables = {s.name: torch.empty(2, s.segment[1] - s.segment[0], s.width) for s in plan.sites}
    with intervention.record(transformer, plan) as rec:
        rec.targets = tables
        transformer(**inputs)
    everything = [list(range(plan.n_units))]
    with intervention.attach(transformer, plan, 2, "cpu") as iv:
        iv.set_rows(intervention.channel_masks(plan, everything, "cpu"), torch.tensor([0, 0]))
        iv.sources, iv.source_rows = tables, torch.tensor([0, 1])
        assert torch.equal(transformer(**inputs)[0], before)
        seen = {}
        handles = [transformer.get_submodule(s.name).register_forward_pre_hook(
            lambda m, a, name=s.name: seen.__setitem__(name, a[0].clone())) for s in plan.sites]
        iv.source_rows = torch.tensor([1, 1])  # row 0 reads row 1's recorded inputs
        try:
            transformer(**inputs)
        finally:
            for h in handles:
                h.remove()
    for s in plan.sites:
        assert torch.equal(seen[s.name][0, s.segment[0]:s.segment[1]], tables[s.name][1])


@torch.no_grad()
def test_zeroing_a_whole_site_leaves_its_bias(tiny_pipe, plan):
    transformer = tiny_pipe.transformer
    site = plan.sites[-1]  # the single-stream to_out: [attention | MLP] input
    units = list(range(site.unit_offset, site.unit_offset + site.n_units))
    inputs = _inputs(plan, 2, seed=1)
    seen = {}
    module = transformer.get_submodule(site.name)
    handle = module.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.clone()))
    try:
        with intervention.attach(transformer, plan, 2, "cpu") as iv:
            iv.set_rows(intervention.channel_masks(plan, [units], "cpu"), torch.tensor([0, 0]))
            hooked = transformer(**inputs)[0]
    finally:
        handle.remove()
    bias = module.bias if module.bias is not None else torch.zeros(module.out_features)  # FLUX.2's is bias-free
    assert torch.equal(seen["out"], bias.expand_as(seen["out"])), "a zero input did not give the bias"
    # By hand: the same model with that projection's weight zeroed computes 0 @ W + b = b as well.
    by_hand = copy.deepcopy(transformer)
    by_hand.get_submodule(site.name).weight.zero_()
    assert torch.equal(hooked, by_hand(**inputs)[0])


def test_random_sets_are_seeded_and_matched(fine_plan):
    selected = [1, 10, 11, 30]  # double attention; single attention x2; single MLP
    first = causal.random_sets(fine_plan, selected, 40, seed=3)
    assert first == causal.random_sets(fine_plan, selected, 40, seed=3)
    assert first != causal.random_sets(fine_plan, selected, 40, seed=4)
    want = causal.strata(fine_plan, selected)
    assert want == {("transformer_blocks.0.attn.to_out.0", "attention"): 1,
                    ("single_transformer_blocks.0.attn.to_out", "attention"): 2,
                    ("single_transformer_blocks.0.attn.to_out", "mlp"): 1}
    for s in first:
        assert len(set(s)) == len(s) == len(selected) and causal.strata(fine_plan, s) == want
    assert len({tuple(s) for s in first}) > 10, "the draws do not vary"


def test_effects_and_comparison_against_scipy():
    rng = np.random.default_rng(0)
    gap_sq = rng.uniform(1, 2, 8)
    dot = rng.normal(0.2, 0.1, (11, 8)) * gap_sq
    dot[0] += 0.5 * gap_sq  # the selected set moves further
    moved_sq = np.abs(dot) * 2
    eff = causal.effects(dot, moved_sq, gap_sq)
    np.testing.assert_allclose(eff.toward, dot / gap_sq)
    out = causal.compare(eff)
    assert out["p_permutation"] == pytest.approx(1 / 11) and out["rank"] == 1
    ref = sps.ttest_1samp(eff.toward[0], 0.0)
    assert out["t_vs_zero"] == pytest.approx(ref.statistic) and out["p_vs_zero"] == pytest.approx(ref.pvalue)
    ref = sps.ttest_rel(eff.toward[0], eff.toward[1:].mean(axis=0))
    assert out["t_vs_random"] == pytest.approx(ref.statistic) and out["p_vs_random"] == pytest.approx(ref.pvalue)
    with pytest.raises(causal.CausalError):
        causal.effects(dot, moved_sq, np.r_[0.0, gap_sq[1:]])


def _planted_model(plan):
    """The tiny model with the planted units' input channels weighed 30x in their projection."""
    from otherview.model import load

    loaded = load("builtin:tiny", "float32", "cpu")
    with torch.no_grad():
        for i in PLANTED:
            u = plan.units[i]
            loaded.pipe.transformer.get_submodule(u.site).weight[:, u.channel_start:u.channel_end] *= 30
    return loaded


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, fine_plan):
    from otherview.interpreter import execute

    folder = tmp_path_factory.mktemp("causal")
    spec_path = folder / "planted.toml"
    spec_path.write_text(_spec_text(4))
    spec, raw = load_spec(spec_path)
    loaded = _planted_model(fine_plan)
    run_dir = execute(spec, raw, str(spec_path), out_dir=str(folder / "runs"), loaded=loaded)
    return run_dir, loaded


def test_planted_units_are_found_and_random_sets_are_not(planted_run, fine_plan):
    run_dir, loaded = planted_run
    req = causal.Request(units=PLANTED, intervention="patch", random_sets=40, seed=1)
    record = causal.run_causal(run_dir, req, loaded=loaded)
    r = record["result"]
    assert record["reproduced_rms_max_relative_difference"] < 1e-6  # the reload computes what exec measured
    assert record["selection"]["strata"] == [{"site": "single_transformer_blocks.0.attn.to_out", "kind": "attention",
                                              "count": 2}]
    arrays = causal.store.read_tensors(run_dir / "causal.safetensors")
    other = [k for k in range(1, 41) if arrays["sets"][k].tolist() != PLANTED]  # a draw may hit the planted set
    assert len(other) >= 36
    mean = arrays["toward"].mean(axis=1)
    disjoint = [k for k in other if not set(arrays["sets"][k].tolist()) & set(PLANTED)]
    assert len(disjoint) >= 20
    # Patching the planted pair closes nearly all of the gap; a set sharing one planted unit part of it; a set
    # sharing none next to nothing.
    assert r["selected_mean_toward"] > 0.8 and np.all(mean[other] < 0.7 * mean[0]), mean
    assert np.all(mean[disjoint] < 0.1 * mean[0]), mean
    assert r["p_permutation"] == pytest.approx((1 + 40 - len(other)) / 41)
    assert r["p_vs_random"] < 0.01
    assert arrays["toward"].shape == (41, 6) and arrays["sets"].shape == (41, 2)
    assert arrays["sets"][0].tolist() == PLANTED
    assert json.loads((run_dir / "causal.json").read_text())["intervention"] == "patch"


def test_short_batches_are_padded_and_change_no_result(planted_run):
    """Batches padded to one shape (for a compiled graph) give the per-item effects of unpadded batches."""
    run_dir, loaded = planted_run
    arrays = {}
    for batch in (1, 4):  # 6 cells x (1 + 6 sets) = 42 intervened rows: batches of 4 end with 2 rows padded
        req = causal.Request(units=PLANTED, intervention="patch", random_sets=6, seed=3, batch_size=batch,
                             compile="off")
        record = causal.run_causal(run_dir, req, loaded=loaded)
        assert record["passes"]["batch_size"] == batch and record["compile"]["compile"] is False
        arrays[batch] = causal.store.read_tensors(run_dir / "causal.safetensors")
    for key in ("toward", "moved", "gap"):
        np.testing.assert_allclose(arrays[4][key], arrays[1][key], rtol=1e-4, atol=1e-6)


def test_cli_follow_up_writes_the_report_section(planted_run, runner, monkeypatch):
    from otherview import model as model_mod
    from otherview.cli import main

    run_dir, loaded = planted_run
    monkeypatch.setattr(model_mod, "load", lambda *a, **k: loaded)  # the planted model, not a fresh random one
    result = runner.invoke(main, ["causal", str(run_dir), "--contrast", "viewpoint_vs_mention", "--top", "3",
                                  "--intervention", "mean", "--random-sets", "5", "--images", "2", "-q"])
    assert result.exit_code == 0, result.output
    report = (run_dir / "report.md").read_text()
    assert "## Causal test" in report and report.index("## Causal test") < report.index("## References")
    assert (run_dir / "figures" / "causal_random_sets.png").exists()
    assert (run_dir / "figures" / "causal_images.png").exists()
    assert causal.store.read_tensors(run_dir / "causal.safetensors")["images"].shape[:2] == (3, 2)
    again = runner.invoke(main, ["report", str(run_dir)])  # a full re-render keeps the section, once
    assert again.exit_code == 0, again.output
    assert (run_dir / "report.md").read_text().count("## Causal test") == 1
    bad = runner.invoke(main, ["causal", str(run_dir), "--contrast", "nope", "--top", "3"])
    assert bad.exit_code == 2 and "no analysis 'nope'" in bad.output


def _specificity_context(fine_plan):
    """A run context without a model: the small design with a control, and made-up t and conjunction arrays."""
    text = _spec_text(4).replace(
        '[contrast]\na = "viewpoint"\nb = "mention"',
        '[[contrasts]]\nname = "perspective"\nweights = { viewpoint = 1, mention = -1 }\n\n'
        '[[contrasts]]\nname = "wording"\nweights = { reworded = 1, mention = -1 }\n\n'
        '[[specificity]]\nname = "beyond"\neffect = "perspective"\ncontrol = "wording"')
    text = text.replace('mention = "Render this kitchen with {animal} in it"',
                        'mention = "Render this kitchen with {animal} in it"\nreworded = "Render this kitchen, {animal} included"')
    plan = build_plan(parse_spec(text), architecture("builtin:tiny"))
    n = plan.n_units
    t = np.linspace(-3, 4, n)
    diff = plan.design.specificity[0].difference
    arrays = {"rms": np.ones((len(plan.passes), n), np.float32), "perspective/t": t, "wording/t": -t,
              f"{diff}/t": np.r_[np.full(n - 5, 0.1), np.arange(5.0)], "beyond/passed": np.r_[np.zeros(n - 5), np.ones(5)]}
    summary = {"specificity": [{"name": "beyond", "key": "beyond", "effect": "perspective", "difference": diff}]}
    return causal.RunContext(Path("."), {}, summary, arrays, plan)


def test_unit_selection(fine_plan):
    ctx = _specificity_context(fine_plan)
    n = ctx.plan.n_units
    top = causal.select_units(ctx, causal.Request(contrast="perspective", top=3))
    assert top.units == [n - 3, n - 2, n - 1] and top.contrast == "perspective" and top.analysis == "perspective"
    assert causal.select_units(ctx, causal.Request(contrast="wording", top=1)).units == [n - 1]
    spec = causal.select_units(ctx, causal.Request(specificity="beyond", top=2))
    # passing units ranked by the smaller of |t effect| and |t difference|: the last two
    assert spec.units == [n - 2, n - 1] and spec.contrast == "perspective"
    listed = causal.select_units(ctx, causal.Request(units=[4, 2], contrast="wording"))
    assert listed.units == [2, 4] and listed.contrast == "wording"
    assert causal.condition_pair(ctx.plan, "wording") == ("reworded", "mention")
    for bad, where in [(causal.Request(), ""), (causal.Request(units=[n]), "--units"),
                       (causal.Request(contrast="perspective", top=n + 1), "--top"),
                       (causal.Request(specificity="nope"), "--specificity"),
                       (causal.Request(units=[1], specificity="beyond"), "")]:
        with pytest.raises(causal.CausalError) as err:
            causal.select_units(ctx, bad)
        assert err.value.problems[0][0] == where


@torch.no_grad()
def test_intervention_hooks_compile_once_per_class_not_per_site():
    """Regional compilation with the intervention and recorder hooks: zero, shared source and per-row source
    modes each compile one graph per block class (never one per site), and agree with eager."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from otherview.compiling import compile_blocks
    from test_capture import _deep_tiny

    transformer, plan = _deep_tiny(3)
    inputs = _inputs(plan, 2, seed=5)
    masks = intervention.channel_masks(plan, [[0, 5, 9, plan.n_units - 1], list(range(3, plan.n_units, 7))], "cpu")
    shared = {s.name: torch.randn(1, s.segment[1] - s.segment[0], s.width) for s in plan.sites}

    def run_all():
        out = []
        tables = {s.name: torch.empty(2, s.segment[1] - s.segment[0], s.width) for s in plan.sites}
        sums = {s.name: torch.zeros(s.segment[1] - s.segment[0], s.width) for s in plan.sites}
        with intervention.record(transformer, plan) as rec:
            rec.targets, rec.sums, rec.weights = tables, sums, torch.tensor([1.0, 0.0])
            out.append(transformer(**inputs)[0])
        with intervention.attach(transformer, plan, 2, "cpu") as iv:
            iv.set_rows(masks, torch.tensor([0, 1]))
            for sources, rows in (({}, None), (shared, None), (tables, torch.tensor([1, 0]))):
                iv.sources, iv.source_rows = sources, rows
                for _ in range(2):  # a second batch reuses the graphs
                    out.append(transformer(**inputs)[0])
        return out, tables, sums

    want, want_tables, want_sums = run_all()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(transformer, counter)
    try:
        got, got_tables, got_sums = run_all()
        # Two block classes x (recorder, zeros, shared source, per-row source): 8 graphs, not 8 x 3 sites.
        # (Hooks that looked their state up by site name built 16: one more graph per site and mode.)
        assert counter.frame_count == 8, f"{counter.frame_count} graphs for 2 block classes x 4 hook modes"
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for name in want_tables:
            torch.testing.assert_close(got_tables[name], want_tables[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_sums[name], want_sums[name], rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
