"""Designs that can tell X from Y: passes, contrasts, the specificity conjunction, replication, guards."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from otherview.analysis import analyse, conjunction
from otherview.cli import main
from otherview.design import DesignError, build_design, min_attainable_p
from otherview.model import architecture
from otherview.plan import build_plan
from otherview.spec import load_spec, parse_spec
from otherview.store import read_csv, read_tensors

SPECS = Path(__file__).resolve().parent / "specs"
ROOT = Path(__file__).resolve().parents[1]


def _design(name="designs.toml"):
    spec, _ = load_spec(SPECS / "pass" / name)
    return build_design(spec)


def test_every_condition_runs_once_whatever_contrasts_use_it():
    d = _design()
    assert d.shape == (3, 6, 2, 2, 2) and len(d.passes) == 144
    # mention is used by both contrasts (and the derived difference) but runs once per cell
    assert sum(p.condition == "mention" for p in d.passes) == 6 * 2 * 2 * 2
    keys = {(p.condition, p.item, p.scene, p.seed, p.wording) for p in d.passes}
    assert len(keys) == len(d.passes)
    assert sorted(d.cell.ravel().tolist()) == list(range(144))
    assert [c.name for c in d.contrasts] == ["perspective", "wording", "perspective_minus_wording"]
    assert d.contrast("perspective_minus_wording").weights == (1.0, 0.0, -1.0)  # viewpoint - reworded
    assert [a.key for a in d.analyses][:2] == ["perspective.step0", "perspective.step1"]


def test_the_card_spec_keeps_its_design():
    spec, _ = load_spec(ROOT / "specs" / "plantain.toml")
    d = build_design(spec)
    assert len(d.passes) == 60 and [c.name for c in d.contrasts] == ["viewpoint_vs_mention"]
    # all fillers of a, then all of b: the card's pass order
    assert [p.condition for p in d.passes] == ["viewpoint"] * 30 + ["mention"] * 30
    assert [p.item for p in d.passes[:30]] == list(range(30))


def test_contrast_arithmetic_against_a_hand_computation():
    d = _design()
    rng = np.random.default_rng(1)
    u = 5
    rms = rng.normal(size=(d.n_rows, u))
    # by hand: rows are pass * n_steps + step
    k = len(d.steps)
    want = np.zeros((6, u))
    for p in d.passes:
        w = {"viewpoint": 1.0, "mention": 0.0, "reworded": -1.0}[p.condition]
        want[p.item] += w * rms[p.index * k + 1] / 8  # 2 scenes x 2 seeds x 2 wordings, step 1
    got = d.contrast_d(rms, "perspective_minus_wording", step_level=1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # one level of one factor alone
    want_scene = np.zeros((6, u))
    for p in d.passes:
        if p.scene == 1:
            w = {"viewpoint": 1.0, "mention": -1.0, "reworded": 0.0}[p.condition]
            want_scene[p.item] += w * rms[p.index * k] / 4
    np.testing.assert_allclose(d.contrast_d(rms, "perspective", 0, only={"scene": 1}), want_scene, rtol=1e-12)


def test_replication_averages_over_scenes_seeds_and_wordings():
    """An effect present in one scene only is halved in the average and whole in that level."""
    d = _design()
    rms = np.ones((d.n_rows, 3))
    for p in d.passes:
        if p.condition == "viewpoint" and p.scene == 0:
            rms[d.row(p.index, 0)] += 2.0
    np.testing.assert_allclose(d.contrast_d(rms, "perspective", 0), 1.0)
    np.testing.assert_allclose(d.contrast_d(rms, "perspective", 0, only={"scene": 0}), 2.0)
    np.testing.assert_allclose(d.contrast_d(rms, "perspective", 0, only={"scene": 1}), 0.0)
    np.testing.assert_allclose(d.contrast_d(rms, "wording", 0), 0.0)


def _brute_fwer(d):
    """Max-|t| family-wise p by enumerating every sign pattern (float64), pair 0 fixed."""
    n = d.shape[0]
    t_obs = np.abs(d.mean(0) / (d.std(0, ddof=1) / np.sqrt(n)))
    exceed = np.zeros(d.shape[1])
    flips = 0
    for signs in itertools.product([1, -1], repeat=n - 1):
        s = np.array((1,) + signs)[:, None]
        x = d * s
        t = np.abs(x.mean(0) / (x.std(0, ddof=1) / np.sqrt(n)))
        exceed += t.max() >= t_obs - 1e-9
        flips += 1
    return exceed / flips, d.mean(0) / (d.std(0, ddof=1) / np.sqrt(n))


def test_conjunction_against_brute_force_with_planted_units():
    """Specific, non-specific and opposite-sign units, on small data enumerated in float64."""
    rng = np.random.default_rng(7)
    n = 10
    noise = lambda: rng.normal(0, 0.3, (n, 6))  # noqa: E731
    effect = np.zeros((n, 6))
    control = np.zeros((n, 6))
    effect[:, 0] = 3.0  # specific: effect only
    effect[:, 1] = control[:, 1] = 3.0  # non-specific: effect equals control
    effect[:, 2] = -3.0  # specific, negative
    effect[:, 3] = 3.0  # opposite sign: effect beyond control but control larger the other way...
    control[:, 3] = 6.0  # ...so effect - control is negative while the effect is positive
    e = effect + noise()
    c = control + noise()
    p_e, t_e = _brute_fwer(e)
    p_diff, t_diff = _brute_fwer(e - c)
    passed = conjunction(p_e, t_e, p_diff, t_diff, 0.05)
    assert passed.tolist() == [True, False, True, False, False, False]
    # the same through the analysis path, with the compiled (or reference) null
    from otherview import stats

    for data, (p_b, t_b) in ((e, (p_e, t_e)), (e - c, (p_diff, t_diff))):
        null = stats.sign_flip_null(data, [3.0], "exact", 0, 0, 0.99)
        np.testing.assert_allclose(null.result.p_fwer, p_b, atol=1e-12)
        np.testing.assert_allclose(stats.paired_t(data), t_b, rtol=1e-10)


def test_analysis_finds_a_specific_unit(tmp_path):
    d = _design()
    rng = np.random.default_rng(3)
    u = 4
    rms = 1.0 + rng.normal(0, 0.05, (d.n_rows, u))
    for p in d.passes:
        for k in range(len(d.steps)):
            if p.condition == "viewpoint":
                rms[d.row(p.index, k), 0] += 1.0  # unit 0: viewpoint only (specific)
            if p.condition in ("viewpoint", "reworded"):
                rms[d.row(p.index, k), 1] += 1.0  # unit 1: any rewording (not specific)
    res = analyse(d, rms)
    tests = {s.key: s for s in res.specificity}
    assert set(tests) == {"beyond_wording.step0", "beyond_wording.step1"}
    assert tests["beyond_wording.step0"].passed.tolist() == [True, False, False, False]
    levels = {(lv.analysis, lv.factor) for lv in res.levels}
    assert ("perspective.step0", "scene") in levels and ("wording.step1", "wording") in levels
    assert not any(lv.analysis.startswith("perspective_minus") for lv in res.levels)


def test_min_attainable_p():
    assert min_attainable_p("exact", 6, 0) == 1 / 32
    assert min_attainable_p("random", 30, 200) == 1 / 200
    assert min_attainable_p("random", 3, 10_000) == 1 / 4


def test_designs_spec_runs_end_to_end(runner, tmp_path):
    result = runner.invoke(main, ["exec", str(SPECS / "pass" / "designs.toml"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    run = Path(result.output.strip().splitlines()[-1])
    passes = read_csv(run / "passes.csv")
    assert len(passes) == 288  # 144 passes x 2 captured steps
    assert {r["step"] for r in passes} == {"0", "1"} and {r["scene"] for r in passes} == {"kitchen", "loft"}
    arrays = read_tensors(run / "rms.safetensors")
    assert arrays["rms"].shape == (288, 10)
    assert arrays["beyond_wording.step0/passed"].shape == (10,)
    summary = json.loads((run / "summary.json").read_text())
    assert [a["key"] for a in summary["analyses"]] == ["perspective.step0", "perspective.step1", "wording.step0",
                                                      "wording.step1", "perspective_minus_wording.step0",
                                                      "perspective_minus_wording.step1"]
    factors = {f["factor"] for rep in summary["replication"] for f in rep["factors"]}
    assert factors == {"scene", "seed", "wording"}
    text = (run / "report.md").read_text()
    assert text.index("## Specificity: beyond_wording") < text.index("## Contrast perspective, step 0")
    assert "## Replication across scenes, seeds and wordings" in text
    assert "figures/beyond_wording.step0.specificity.png" in text
    assert (run / "reference-kitchen.png").exists() and (run / "reference-loft.png").exists()


def test_plan_prints_every_prompt(runner):
    result = runner.invoke(main, ["plan", str(ROOT / "specs" / "plantain-controlled.toml"), "--model", "builtin:tiny",
                                  "--prompts"])
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("  ") and "tokens: " in x]
    assert len(lines) == 1620
    assert "Render this kitchen from the viewpoint of an adult human" in lines[0]


def test_a_prompt_that_would_be_cut_is_refused(runner, tmp_path):
    text = (SPECS / "pass" / "small.toml").read_text().replace("max_sequence_length = 128", "max_sequence_length = 60")
    (tmp_path / "cut.toml").write_text(text)
    for command in ("plan", "exec"):
        result = runner.invoke(main, [command, str(tmp_path / "cut.toml"), "--out", str(tmp_path / "runs")]
                               if command == "exec" else [command, str(tmp_path / "cut.toml")])
        assert result.exit_code == 2, result.output
        assert "model.max_sequence_length: the prompt \"Render this kitchen from the viewpoint of a cat\" takes" in \
            result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad, message", [
    ('viewpoint = "This kitchen as seen by {animal!s}"', "has a conversion or format spec"),
    ('viewpoint = "This kitchen as seen by {animal.name}"', "is not a plain name"),
    ('viewpoint = "This kitchen {{as}} seen by {animal}"', "literal braces"),
])
def test_templates_are_plain(bad, message):
    text = (SPECS / "pass" / "minimal.toml").read_text()
    text = text.replace('viewpoint = "This kitchen as seen by {animal}"', bad)
    from otherview.spec import SpecError

    with pytest.raises(SpecError, match=message.replace("{", r"\{")):
        parse_spec(text)


def test_identical_wording_for_one_item_only_is_caught():
    text = (SPECS / "pass" / "minimal.toml").read_text()
    text = text.replace('mention = "This kitchen with {animal} in it"', 'mention = "This kitchen as seen by {animal}"')
    with pytest.raises(DesignError, match="render identically for item 'a cat'"):
        build_design(parse_spec(text))


def test_unit_width_head_resolves_to_the_head_width():
    spec, _ = load_spec(ROOT / "specs" / "plantain-heads.toml")
    plan = build_plan(spec, architecture("builtin:klein-4b"))
    assert plan.unit_width == 128 and plan.n_units == 2160
    single = [u for u in plan.units if u.site == "single_transformer_blocks.0.attn.to_out"]
    assert sum(u.kind == "attention" for u in single) == 24 and sum(u.kind == "mlp" for u in single) == 72


def test_prompt_tokens_count_only_real_text_tokens(tmp_path):
    """capture.tokens = "prompt": each row's RMS over its own unpadded prompt tokens, by hand."""
    import torch

    from otherview.interpreter import execute, prompt_masks
    from otherview.model import build_builtin
    from otherview.spec import with_overrides

    spec, raw = load_spec(SPECS / "pass" / "small.toml")
    spec = with_overrides(spec, {"capture.tokens": "prompt", "probe.batch_size": 4})
    spec = spec.model_copy(update={"capture": spec.capture.model_copy(
        update={"sites": ["single_transformer_blocks.*.attn.to_out"]})})
    run = execute(spec, raw, "small.toml", out_dir=str(tmp_path / "a"))
    rms = read_tensors(run / "rms.safetensors")["rms"]
    one = execute(with_overrides(spec, {"probe.batch_size": 1}), raw, "small.toml", out_dir=str(tmp_path / "b"))
    np.testing.assert_allclose(read_tensors(one / "rms.safetensors")["rms"], rms, rtol=1e-5)
    # by hand for pass 0: the hooked input's first (real) tokens, through the same tokenizer
    pipe = build_builtin("tiny")
    plan = build_plan(spec, architecture("builtin:tiny"))
    mask = prompt_masks(pipe.tokenizer, [plan.passes[0].prompt], plan.text_tokens)[0]
    n_real = int(mask.sum())
    assert 0 < n_real < plan.text_tokens
    seen = {}
    module = dict(pipe.transformer.named_modules())["single_transformer_blocks.0.attn.to_out"]
    module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    from otherview import interpreter
    from PIL import Image

    image = Image.open(run / "reference.png")
    inputs = interpreter.prepare_probe_inputs(type("L", (), {"pipe": pipe, "device": torch.device("cpu"),
                                                             "dtype": torch.float32})(), plan, [image])
    pipe.transformer(hidden_states=torch.cat([inputs.latents[:1], inputs.image_latents[:1]], dim=1),
                     timestep=torch.ones(1), guidance=None, encoder_hidden_states=inputs.prompt_embeds[:1],
                     txt_ids=inputs.text_ids, img_ids=torch.cat([inputs.latent_ids, inputs.image_latent_ids], dim=1),
                     return_dict=False)
    x = seen["x"][0, : plan.text_tokens][mask.bool()].double()  # [real tokens, width]
    by_hand = x.pow(2).reshape(n_real, -1, plan.unit_width).mean(dim=(0, 2)).sqrt().numpy()
    np.testing.assert_allclose(rms[0], by_hand, rtol=1e-4)
