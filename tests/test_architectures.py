"""The FLUX.2 Klein family from configs alone: 9B plans, roles, head-wide units, the KV variant."""

import inspect
import json
from pathlib import Path

import pytest

from otherview.architectures import (KLEIN_KV_PIPELINE, TEXT_ENCODER_OUT_LAYERS, TokenCounts, role_names,
                                     units_by_role)
from otherview.model import ModelUnavailable, architecture, known_hub_ids
from otherview.plan import PlanError, build_plan
from otherview.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
ROLES = ["attention-out image", "attention-out text", "single out"]


@pytest.fixture(scope="module")
def plantain():
    return load_spec(ROOT / "specs" / "plantain.toml")[0]


def _capture(spec, **kw):
    # model_copy skips validation, so unit_width = "head" can be tried before the spec accepts it.
    return spec.model_copy(update={"capture": spec.capture.model_copy(update=kw)})


def test_klein_9b_architecture_from_configs():
    a = architecture("builtin:klein-9b")
    assert (a.n_double, a.n_single, a.n_heads, a.head_dim) == (8, 24, 32, 128)
    assert (a.inner_dim, a.mlp_hidden, a.vae_scale_factor, a.token_multiple) == (4096, 12288, 8, 16)
    assert a.transformer["joint_attention_dim"] == 3 * a.text_encoder["hidden_size"] == 12288
    assert a.text_encoder_out_layers == TEXT_ENCODER_OUT_LAYERS == (9, 18, 27)
    assert a.text_encoder["num_hidden_layers"] == 36 and a.random_weights
    assert not a.reference_self_attention and a.image_stream == ("target", "reference")
    assert "8 double + 24 single blocks, 32 heads x 128" in a.summary()
    four = architecture("builtin:klein-4b")
    assert (four.n_double, four.n_single, four.n_heads, four.inner_dim) == (5, 20, 24, 3072)
    assert four.text_encoder_out_layers == (9, 18, 27) and four.text_encoder["hidden_size"] * 3 == 7680
    assert architecture("builtin:tiny").text_encoder_out_layers == (1, 2, 3)


def test_klein_9b_default_plan_units_per_site_and_kind(plantain):
    plan = build_plan(plantain, architecture("builtin:klein-9b"))
    assert plan.n_units == 8 * 256 + 24 * 1024 == 26_624
    double, single = plan.sites[:8], plan.sites[8:]
    assert len(single) == 24 and all(s.role == "attention-out image" for s in double)
    assert {(s.n_units, s.attention_units, s.mlp_units, s.heads) for s in double} == {(256, 256, 0, 32)}
    assert {(s.n_units, s.attention_units, s.mlp_units, s.heads) for s in single} == {(1024, 256, 768, 32)}
    kinds = [u.kind for u in plan.units]
    assert kinds.count("attention") == 8 * 256 + 24 * 256 and kinds.count("mlp") == 24 * 768
    assert (double[0].segment, single[0].segment, single[0].tokens) == ((0, 8192), (0, 8704), 8704)


def test_klein_9b_head_wide_units_with_the_text_stream(plantain):
    arch = architecture("builtin:klein-9b")
    spec = _capture(plantain, sites=ROLES, unit_width="head")
    plan = build_plan(spec, arch)
    assert plan.n_units == 8 * 32 + 8 * 32 + 24 * 128 == 3_584
    assert build_plan(_capture(spec, unit_width=128), arch).n_units == plan.n_units
    # Forward order: per double block its image then its text projection, then the single blocks.
    assert [s.name for s in plan.sites[:2]] == ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out"]
    assert units_by_role(plan.sites) == [
        {"role": "attention-out image", "sites": 8, "heads": 256, "attention_units": 256, "mlp_units": 0},
        {"role": "attention-out text", "sites": 8, "heads": 256, "attention_units": 256, "mlp_units": 0},
        {"role": "single out", "sites": 24, "heads": 768, "attention_units": 768, "mlp_units": 24 * 96}]
    text = plan.sites[1]
    assert (text.kind, text.tokens, text.segment) == ("text", 512, (0, 512))
    single = [u for u in plan.units if u.site == "single_transformer_blocks.5.attn.to_out"]
    assert [u.head for u in single[:32]] == list(range(32)) and {u.subgroup for u in single[:32]} == {0}
    mlp = single[32:]
    assert len(mlp) == 96 and all(u.kind == "mlp" and u.head == -1 for u in mlp)
    assert (mlp[0].channel_start, mlp[0].subgroup, mlp[-1].channel_end) == (4096, 0, 16384)
    # 16-channel units with the text stream as well: 8 x 256 x 2 + 24 x 1,024.
    assert build_plan(_capture(plantain, sites=ROLES), arch).n_units == 28_672


def test_roles_and_patterns_select_the_same_sites(plantain):
    arch = architecture("builtin:klein-4b")
    by_role = build_plan(_capture(plantain, sites=["attention-out image", "single out"]), arch)
    by_pattern = build_plan(plantain, arch)
    assert [s.name for s in by_role.sites] == [s.name for s in by_pattern.sites] and by_role.n_units == 16_320
    mixed = build_plan(_capture(plantain, sites=["single out", "single_transformer_blocks.3.*", "attention-out text"]), arch)
    assert [s.role for s in mixed.sites].count("single out") == 20 and len(mixed.sites) == 25
    text_only = build_plan(_capture(plantain, sites=["attention-out text"], tokens="text"), arch)
    assert {s.name.rsplit(".", 1)[-1] for s in text_only.sites} == {"to_add_out"} and text_only.n_units == 5 * 192


def test_unknown_role_or_unmatched_pattern_names_the_roles(plantain):
    arch = architecture("builtin:klein-9b")
    with pytest.raises(PlanError, match="'attention-out video' is no site role") as exc:
        build_plan(_capture(plantain, sites=["attention-out video"]), arch)
    assert all(r in str(exc.value) for r in role_names()) and role_names() == ROLES
    with pytest.raises(PlanError, match="'transformer_blocks.9.*' matches no capturable projection") as exc:
        build_plan(_capture(plantain, sites=["transformer_blocks.9.*"]), arch)  # 9B has blocks 0..7
    assert "'single out'" in str(exc.value) and "single_transformer_blocks.*.attn.to_out" in str(exc.value)


def test_text_tokens_at_image_sites_is_still_an_error(plantain):
    with pytest.raises(PlanError, match="never sees 'text' tokens"):
        build_plan(_capture(plantain, sites=["attention-out image"], tokens="text"), architecture("builtin:klein-9b"))


def test_known_hub_ids_plan_offline():
    ids = known_hub_ids()
    assert set(ids) == {"black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-4B",
                        "black-forest-labs/FLUX.2-klein-base-9B", "black-forest-labs/FLUX.2-klein-9B",
                        "black-forest-labs/FLUX.2-klein-9b-kv"}
    flags = {i: (architecture(i).n_heads, architecture(i).distilled, architecture(i).reference_self_attention) for i in ids}
    assert flags == {"black-forest-labs/FLUX.2-klein-base-4B": (24, False, False),
                     "black-forest-labs/FLUX.2-klein-4B": (24, True, False),
                     "black-forest-labs/FLUX.2-klein-base-9B": (32, False, False),
                     "black-forest-labs/FLUX.2-klein-9B": (32, True, False),
                     "black-forest-labs/FLUX.2-klein-9b-kv": (32, True, True)}
    hub = architecture("black-forest-labs/FLUX.2-klein-9B")
    assert not hub.random_weights and hub.resolution is None and hub.source == "black-forest-labs/FLUX.2-klein-9B"
    assert architecture("black-forest-labs/flux.2-klein-9b").n_heads == 32  # hub ids are case-insensitive
    with pytest.raises(ModelUnavailable, match="builtin:klein-9b"):
        architecture("someone/unknown-model")


def test_kv_variant_layout_and_forward_keywords():
    kv = architecture("black-forest-labs/FLUX.2-klein-9b-kv")
    assert kv.pipeline_class == KLEIN_KV_PIPELINE and kv.reference_self_attention
    counts = TokenCounts(512, 4096, 4096)
    # Flux2KleinKVPipeline puts the reference first: [text | reference | target] in single blocks.
    assert kv.image_stream == ("reference", "target")
    assert kv.segment("image", "target", counts) == (4096, 8192) and kv.segment("joint", "target", counts) == (4608, 8704)
    assert kv.segment("joint", "reference", counts) == (512, 4608) and kv.segment("text", "all", counts) == (0, 512)
    assert kv.probe_forward_kwargs(4096) == {"kv_cache_mode": "extract", "num_ref_tokens": 4096}
    assert architecture("builtin:klein-9b").probe_forward_kwargs(4096) == {}
    assert "KV" in kv.summary() and "reference before the target" in kv.summary()
    # Guidance: real CFG only on a base model; the KV pipeline takes no guidance keyword.
    assert kv.evaluations_per_step(4.0) == 1 and kv.generation_kwargs(4.0) == {}
    base, distilled = architecture("black-forest-labs/FLUX.2-klein-base-9B"), architecture("black-forest-labs/FLUX.2-klein-9B")
    assert (base.evaluations_per_step(4.0), base.evaluations_per_step(1.0), distilled.evaluations_per_step(4.0)) == (2, 1, 1)
    assert distilled.generation_kwargs(1.0) == {"guidance_scale": 1.0}


def test_kv_variant_refuses_counting_reference_tokens(plantain):
    kv = architecture("black-forest-labs/FLUX.2-klein-9b-kv")
    with pytest.raises(PlanError, match="reference tokens attend only to themselves.*exactly 0"):
        build_plan(_capture(plantain, tokens="reference"), kv)
    for tokens in ("all", "image"):  # these ranges include the reference tokens at image and single sites
        with pytest.raises(PlanError, match=f"capture.tokens = '{tokens}' counts the reference tokens at 32 site"):
            build_plan(_capture(plantain, tokens=tokens), kv)
    plan = build_plan(_capture(plantain, tokens="target"), kv)
    assert plan.n_units == 26_624 and plan.sites[0].segment == (4096, 8192) and plan.sites[-1].segment == (4608, 8704)
    # Text-stream sites never see reference tokens: counting "all" there is fine.
    assert build_plan(_capture(plantain, sites=["attention-out text"]), kv).n_units == 8 * 256
    # The same spec on the non-KV 9B counts reference tokens without complaint.
    assert build_plan(_capture(plantain, tokens="reference"), architecture("black-forest-labs/FLUX.2-klein-9B")).n_units == 26_624


def _folder(tmp_path, model_index, name="pipe"):
    folder = tmp_path / name
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text((ROOT / "otherview" / "configs" / "klein-9b" / "transformer.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(model_index))
    return folder


def test_variant_detected_from_a_folders_model_index(tmp_path):
    kv = architecture(str(_folder(tmp_path, {"_class_name": "Flux2KleinKVPipeline"}, "kv")))
    assert kv.reference_self_attention and kv.distilled is True and kv.text_encoder_out_layers == (9, 18, 27)
    base = architecture(str(_folder(tmp_path, {"_class_name": "Flux2KleinPipeline", "is_distilled": False}, "base")))
    assert not base.reference_self_attention and base.distilled is False
    with pytest.raises(ModelUnavailable, match="not a FLUX.2 Klein pipeline"):
        architecture(str(_folder(tmp_path, {"_class_name": "FluxPipeline"}, "flux1")))


def test_saved_pipeline_states_its_variant(tiny_folder):
    arch = architecture(str(tiny_folder))  # save_pretrained writes model_index.json with is_distilled
    assert arch.pipeline_class == "Flux2KleinPipeline" and arch.distilled is False and arch.random_weights


def test_facts_match_the_installed_diffusers():
    """The stacked layers and every site's module name and input width, checked on meta-device builds."""
    import diffusers

    for cls in (diffusers.Flux2KleinPipeline, diffusers.Flux2KleinKVPipeline):
        assert inspect.signature(cls.encode_prompt).parameters["text_encoder_out_layers"].default == TEXT_ENCODER_OUT_LAYERS
    from otherview.model import build_builtin

    for name, params in (("klein-4b", 3.876e9), ("klein-9b", 9.079e9)):
        pipe = build_builtin(name, device="meta")  # module tree and shapes only, nothing allocated
        modules = dict(pipe.transformer.named_modules())
        for site in architecture(f"builtin:{name}").sites():
            assert modules[site.name].in_features == site.width, site.name
        assert abs(sum(p.numel() for p in pipe.transformer.parameters()) - params) < 1e6
        assert len(pipe.text_encoder.model.layers) > max(TEXT_ENCODER_OUT_LAYERS)


@pytest.mark.parametrize("kv", [False, True])
def test_reference_tokens_differ_by_prompt_only_without_kv(tiny_pipe, kv):
    """Run diffusers' own KV forward: reference-token inputs of every site are equal across prompts."""
    import dataclasses

    import torch
    from diffusers import Flux2KleinPipeline as P
    from diffusers.models.transformers.transformer_flux2 import (Flux2AttnProcessor, Flux2KVAttnProcessor,
                                                                 Flux2KVParallelSelfAttnProcessor,
                                                                 Flux2ParallelSelfAttnProcessor)

    arch = architecture("builtin:tiny")
    if kv:
        arch = dataclasses.replace(arch, pipeline_class=KLEIN_KV_PIPELINE)
    t = tiny_pipe.transformer
    counts = TokenCounts(8, 16, 16)
    g = torch.Generator().manual_seed(0)
    cfg = arch.transformer
    target, reference = (torch.randn(1, cfg["in_channels"], 4, 4, generator=g) for _ in range(2))
    ids = arch.join_image_stream(P._prepare_latent_ids(target), P._prepare_image_ids([reference]))
    hidden = arch.join_image_stream(P._pack_latents(target), P._pack_latents(reference))
    seen = {}
    hooks = [t.get_submodule(s.name).register_forward_pre_hook(
        lambda m, a, n=s.name: seen.setdefault(n, []).append(a[0].clone())) for s in arch.sites()]
    try:
        if kv:  # what Flux2KleinKVPipeline installs
            for b in t.transformer_blocks:
                b.attn.set_processor(Flux2KVAttnProcessor())
            for b in t.single_transformer_blocks:
                b.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
        with torch.no_grad():
            for _ in range(2):  # two prompts
                text = torch.randn(1, counts.text, cfg["joint_attention_dim"], generator=g)
                t(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([1.0]), img_ids=ids,
                  txt_ids=P._prepare_text_ids(text), guidance=None, return_dict=False,
                  **arch.probe_forward_kwargs(counts.reference))
    finally:
        for h in hooks:
            h.remove()
        for b in t.transformer_blocks:
            b.attn.set_processor(Flux2AttnProcessor())
        for b in t.single_transformer_blocks:
            b.attn.set_processor(Flux2ParallelSelfAttnProcessor())
    for site in arch.sites():
        first, second = seen[site.name]
        assert first.shape[1] == arch.site_tokens(site.kind, counts)
        for part in arch.token_parts(site.kind):
            s, e = arch.segment(site.kind, part, counts)
            same = torch.equal(first[:, s:e], second[:, s:e])
            assert same == (kv and part == "reference"), (site.name, part)
