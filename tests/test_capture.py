"""Capture hooks: read-only, fully removable, and equal to a float64 computation of the RMS."""

from pathlib import Path

import pytest
import torch

from otherview import capture
from otherview.model import architecture
from otherview.plan import build_plan
from otherview.spec import load_spec

SPECS = Path(__file__).resolve().parent / "specs"


@pytest.fixture(scope="module")
def plan():
    spec, _ = load_spec(SPECS / "pass" / "small.toml")
    return build_plan(spec, architecture("builtin:tiny"))


def _inputs(plan, batch, seed=0):
    from diffusers import Flux2KleinPipeline as P

    g = torch.Generator().manual_seed(seed)
    cfg = plan.arch.transformer
    side = int(plan.target_tokens ** 0.5)
    lat = torch.randn(batch, cfg["in_channels"], side, side, generator=g)
    ids = torch.cat([P._prepare_latent_ids(lat), P._prepare_image_ids([lat[:1]]).expand(batch, -1, -1)], dim=1)
    hidden = torch.randn(batch, plan.target_tokens + plan.reference_tokens, cfg["in_channels"], generator=g)
    text = torch.randn(batch, plan.text_tokens, cfg["joint_attention_dim"], generator=g)
    return dict(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.full((batch,), 0.7),
                img_ids=ids, txt_ids=P._prepare_text_ids(text), guidance=None, return_dict=False)


@torch.no_grad()
def test_hooks_are_read_only_and_removable(tiny_pipe, plan):
    transformer = tiny_pipe.transformer
    inputs = _inputs(plan, 3)
    before = transformer(**inputs)[0]
    buffer = torch.zeros(3, 1, plan.n_units)
    with capture.attach(transformer, plan, buffer) as cap:
        cap.reset(3)
        hooked = transformer(**inputs)[0]
    after = transformer(**inputs)[0]
    assert torch.equal(before, hooked), "a capture hook changed the model's output"
    assert torch.equal(before, after), "the model differs after the hooks were removed"
    assert not any(m._forward_pre_hooks for m in transformer.modules())
    assert buffer.abs().sum() > 0


@torch.no_grad()
def test_captured_rms_matches_float64(tiny_pipe, plan):
    transformer = tiny_pipe.transformer
    inputs = _inputs(plan, 2, seed=1)
    seen = {}
    handles = [transformer.get_submodule(s.name).register_forward_pre_hook(
        lambda m, a, name=s.name: seen.__setitem__(name, a[0].double().clone())) for s in plan.sites]
    try:
        buffer = torch.full((2, 1, plan.n_units), float("nan"))
        with capture.attach(transformer, plan, buffer) as cap:
            cap.reset(2)
            cap.evaluations = 1
            transformer(**inputs)
            rms = cap.rms()
    finally:
        for h in handles:
            h.remove()
    g = plan.spec.capture.unit_width
    for site in plan.sites:
        x = seen[site.name][:, site.segment[0]:site.segment[1]]
        ref = x.pow(2).reshape(x.shape[0], x.shape[1], -1, g).mean(dim=(1, 3)).sqrt()
        got = rms[:, site.unit_offset:site.unit_offset + site.n_units].double()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@torch.no_grad()
def test_inactive_capture_accumulates_nothing(tiny_pipe, plan):
    buffer = torch.zeros(1, 1, plan.n_units)
    with capture.attach(tiny_pipe.transformer, plan, buffer) as cap:
        cap.reset(1)
        cap.active = False
        tiny_pipe.transformer(**_inputs(plan, 1))
    assert torch.count_nonzero(buffer) == 0


def test_missing_site_names_the_module_and_leaves_no_hooks(tiny_pipe, plan):
    from dataclasses import replace

    broken = replace(plan, sites=plan.sites + [replace(plan.sites[0], name="transformer_blocks.9.attn.to_out.0")])
    with pytest.raises(capture.CaptureError, match="transformer_blocks.9.attn.to_out.0"):
        capture.attach(tiny_pipe.transformer, broken, torch.zeros(1, 1, plan.n_units))
    assert not any(m._forward_pre_hooks for m in tiny_pipe.transformer.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_side_stream_capture_equals_inline_on_cuda(plan):
    from otherview.model import build_builtin

    transformer = build_builtin("tiny", dtype=torch.bfloat16, device="cuda").transformer
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _inputs(plan, 3, seed=2).items()}
    for key in ("hidden_states", "encoder_hidden_states"):
        inputs[key] = inputs[key].bfloat16()
    results = []
    for side in (False, True):
        buffer = torch.zeros(3, 1, plan.n_units, device="cuda")
        with capture.attach(transformer, plan, buffer, side_stream=side) as cap:
            cap.reset(3)
            cap.evaluations = 1
            out = transformer(**inputs)[0]
            results.append((cap.rms(), out))
    assert torch.equal(results[0][0], results[1][0]), "side-stream capture differs from inline capture"
    assert torch.equal(results[0][1], results[1][1]), "side-stream capture changed the model's output"


def _deep_tiny(layers: int = 3):
    """A tiny transformer with ``layers`` blocks of each class (the built-in tiny has one) and its plan."""
    from dataclasses import replace

    from diffusers import Flux2Transformer2DModel

    spec, _ = load_spec(SPECS / "pass" / "small.toml")
    base = architecture("builtin:tiny")
    config = {**base.transformer, "num_layers": layers, "num_single_layers": layers}
    arch = replace(base, transformer=config)
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    return model, build_plan(spec, arch)


@torch.no_grad()
def test_hooked_blocks_compile_once_per_class_not_per_site():
    """Regional compilation with capture hooks: one graph per block class, no recompile per site."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from otherview.compiling import compile_blocks

    transformer, plan = _deep_tiny(3)
    inputs = _inputs(plan, 2, seed=3)
    eager_buf = torch.zeros(2, 1, plan.n_units)
    with capture.attach(transformer, plan, eager_buf) as cap:
        cap.reset(2)
        want = transformer(**inputs)[0]

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    assert compile_blocks(transformer, counter) == "regional"
    try:
        buf = torch.zeros(2, 1, plan.n_units)
        with capture.attach(transformer, plan, buf) as cap:
            for _ in range(2):  # a second batch reuses the graphs
                cap.reset(2)
                got = transformer(**inputs)[0]
        # Two block classes (double- and single-stream), three blocks each: two graphs in all.
        assert counter.frame_count == 2, f"{counter.frame_count} graphs for 2 block classes x 3 sites"
        assert not counters["recompiles"], f"recompiled: {dict(counters['recompiles'])}"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(buf, eager_buf, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


@torch.no_grad()
def test_compiled_blocks_keep_one_graph_per_class_across_batches_and_no_hooks():
    """Unhooked calls after a hooked one compile at most one more graph per class, never per site."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from otherview.compiling import compile_blocks, eager

    transformer, plan = _deep_tiny(3)
    inputs = _inputs(plan, 2, seed=4)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compile_blocks(transformer, counter)
    try:
        with eager():  # the reference generation's stance: nothing compiles
            transformer(**inputs)
        assert counter.frame_count == 0
        buf = torch.zeros(2, 1, plan.n_units)
        with capture.attach(transformer, plan, buf) as cap:
            cap.reset(2)
            transformer(**inputs)
        transformer(**inputs)  # hooks removed: one graph per class for the unhooked blocks
        assert counter.frame_count == 4
    finally:
        torch._dynamo.reset()
