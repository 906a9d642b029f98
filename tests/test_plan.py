"""Plans compile without weights: unit counts, labels, token segments, passes."""

from pathlib import Path

import pytest

from otherview.cli import main
from otherview.model import architecture
from otherview.plan import PlanError, build_plan
from otherview.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plantain():
    return load_spec(ROOT / "specs" / "plantain.toml")[0]


def _with(spec, section, **kw):
    return spec.model_copy(update={section: getattr(spec, section).model_copy(update=kw)})


def test_klein_4b_unit_counts(plantain):
    arch = architecture("builtin:klein-4b")
    plan = build_plan(plantain, arch)
    assert plan.n_units == 16_320
    assert len(plan.sites) == 25 and len(plan.passes) == 60 and len(plan.prompts) == 60
    assert [s.n_units for s in plan.sites[:5]] == [192] * 5 and {s.n_units for s in plan.sites[5:]} == {768}
    assert build_plan(_with(plantain, "capture", unit_width=128), arch).n_units == 2_040
    # The hub id plans with the same architecture, from shipped configs, without weights.
    assert build_plan(plantain, architecture(plantain.model.source)).n_units == 16_320


def test_unit_labels(plantain):
    plan = build_plan(plantain, architecture("builtin:klein-4b"))
    single = [u for u in plan.units if u.site == "single_transformer_blocks.3.attn.to_out"]
    assert len(single) == 768
    attn = [u for u in single if u.kind == "attention"]
    assert len(attn) == 3072 // 16 and attn[-1].head == 23 and attn[-1].subgroup == 7
    mlp = [u for u in single if u.kind == "mlp"]
    assert len(mlp) == 9216 // 16 and mlp[0].channel_start == 3072 and mlp[0].head == -1
    assert [u.index for u in plan.units] == list(range(plan.n_units))
    double = [u for u in plan.units if u.stream == "double"]
    assert all(u.kind == "attention" for u in double) and double[16].head == 2


def test_token_segments(plantain):
    plan = build_plan(plantain, architecture("builtin:klein-4b"))
    assert (plan.text_tokens, plan.target_tokens, plan.reference_tokens) == (512, 4096, 4096)
    double, single = plan.sites[0], plan.sites[-1]
    assert double.tokens == 8192 and double.segment == (0, 8192)
    assert single.tokens == 8704 and single.segment == (0, 8704)
    ref = build_plan(_with(plantain, "capture", tokens="reference"), architecture("builtin:klein-4b"))
    assert ref.sites[0].segment == (4096, 8192) and ref.sites[-1].segment == (4608, 8704)


def test_text_tokens_at_image_only_sites_is_an_error(plantain):
    with pytest.raises(PlanError, match="never sees 'text' tokens"):
        build_plan(_with(plantain, "capture", tokens="text"), architecture("builtin:klein-4b"))


def test_site_pattern_matching_nothing_is_an_error(plantain):
    with pytest.raises(PlanError, match="'blocks.*' matches no capturable projection"):
        build_plan(_with(plantain, "capture", sites=["blocks.*"]), architecture("builtin:klein-4b"))


def test_unit_width_must_respect_heads(plantain):
    with pytest.raises(PlanError, match="straddles"):
        build_plan(_with(plantain, "capture", unit_width=48), architecture("builtin:klein-4b"))


def test_plan_command_prints_passes_and_units(runner):
    result = runner.invoke(main, ["plan", str(ROOT / "specs" / "plantain.toml"), "--model", "builtin:klein-4b"])
    assert result.exit_code == 0, result.output
    assert "probe passes: 60" in result.output and "units: 16320" in result.output
    assert "RANDOM WEIGHTS" in result.output and "2^29" in result.output
    # 2^29 flips x 16,320 units is over this CPU's exact budget: auto falls back to random flips here.
    assert "null method on this machine (cpu): random" in result.output


def test_plan_unknown_model_names_the_fix(runner, tmp_path):
    result = runner.invoke(main, ["plan", str(ROOT / "specs" / "plantain.toml"), "--model", "someone/unknown-model"])
    assert result.exit_code == 3
    assert "--model builtin:klein-4b" in result.output and "Traceback" not in result.output


def test_plan_command_on_klein_9b_allocates_no_weights(runner, monkeypatch):
    import time

    import torch

    def no_weights(*args, **kwargs):
        raise AssertionError("otherview plan built a layer (allocated weights)")

    monkeypatch.setattr(torch.nn.Linear, "__init__", no_weights)
    start = time.perf_counter()
    result = runner.invoke(main, ["plan", str(ROOT / "specs" / "plantain.toml"), "--model", "builtin:klein-9b"])
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < 10
    assert "units: 26624" in result.output
    assert "double-stream: 8 sites, 2048 units (2048 attention, 0 MLP)" in result.output
    assert "single-stream: 24 sites, 24576 units (6144 attention, 18432 MLP)" in result.output
    assert "attention-out image: 8 sites, 256 heads" in result.output


def test_klein_4b_heads_per_stream(plantain):
    sites = ["attention-out image", "attention-out text", "single out"]
    plan = build_plan(_with(plantain, "capture", sites=sites, unit_width=128), architecture("builtin:klein-4b"))
    assert plan.n_units == 5 * 24 + 5 * 24 + 20 * (24 + 72) == 2_160
    heads = {s.role: 0 for s in plan.sites}
    for s in plan.sites:
        heads[s.role] += s.heads
    assert heads == {"attention-out image": 120, "attention-out text": 120, "single out": 480}
    assert sum(s.mlp_units for s in plan.sites) == 20 * 72 == sum(u.kind == "mlp" for u in plan.units)
    # The card's default still gives 16,320 16-channel units, three quarters of them MLP channels.
    default = build_plan(plantain, architecture("builtin:klein-4b"))
    assert default.n_units == 16_320 and sum(s.mlp_units for s in default.sites) == 20 * 576 == 11_520


def test_kv_refusal_through_the_cli(runner):
    result = runner.invoke(main, ["plan", str(ROOT / "specs" / "plantain.toml"), "--model", "black-forest-labs/FLUX.2-klein-9b-kv"])
    assert result.exit_code == 2 and "reference tokens attend only to themselves" in result.output
    assert "Traceback" not in result.output
