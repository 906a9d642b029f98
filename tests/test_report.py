"""The report and its figures on a synthetic Klein-4B-shaped run (16,320 units, no model), and the run
directory ``otherview exec`` writes for them."""

import json
import re
import struct

import numpy as np
import pytest

from otherview import figures, inference, report, store
from otherview.model import architecture
from otherview.plan import build_plan
from otherview.spec import load_spec, spec_hash
from conftest import ROOT, SPECS

PLANTED_BLOCK = 2  # double-stream block whose every unit responds
AXIS_UNITS = [700, 3000, 9001, 16000]  # units whose difference follows the creature axis


def _write_run(run_dir, plan, rms, random_weights=True):
    """Write what ``interpreter._execute`` writes after the probes (``outputs.write_results``), from per-pass RMS."""
    from otherview.analysis import analyse
    from otherview.outputs import write_results
    from otherview.phases import Phases

    spec = plan.spec
    results = analyse(plan.design, rms)
    manifest = {"status": "complete", "spec_path": "specs/plantain.toml", "spec": spec.model_dump(mode="json"),
                "spec_hash": spec_hash(spec), "random_weights": random_weights,
                "model": {"source": plan.arch.source, "dtype": "bfloat16"}, "resolution": [plan.height, plan.width],
                "resolution_note": plan.resolution_note, "versions": {"torch": "x", "diffusers": "y", "numpy": "z"},
                "git_sha": "abc", "device": {"device": "cuda", "gpu": "NVIDIA H100"}, "phases": {"probe": 1.0}}
    store.write_json(run_dir / "manifest.json", manifest)
    write_results(plan, rms, results, run_dir, Phases(), manifest)  # records the files' hashes in the manifest
    store.write_json(run_dir / "manifest.json", manifest)
    res = results.contrasts[0]
    return res.d, res.t, res.inf


@pytest.fixture(scope="module")
def klein_run(tmp_path_factory):
    """Plantain on the Klein 4B layout with fake RMS: block D2 responds, four units follow the axis."""
    spec, _ = load_spec(ROOT / "specs" / "plantain.toml")
    spec = spec.model_copy(update={"null": spec.null.model_copy(update={"method": "random"})})
    plan = build_plan(spec, architecture("builtin:klein-4b"))
    rng = np.random.default_rng(0)
    n, u = len(spec.axis.fillers), plan.n_units
    mention = rng.gamma(4.0, 0.05, size=u) + rng.normal(0, 0.01, (n, u))
    effect = np.zeros(u)
    site = plan.sites[PLANTED_BLOCK]
    effect[site.unit_offset: site.unit_offset + site.n_units] = 0.03 * rng.choice([-1, 1], site.n_units)
    ranks = np.asarray(spec.ranks())
    effect = effect + np.outer((ranks - ranks.mean()) / ranks.std(), np.isin(np.arange(u), AXIS_UNITS) * 0.03)
    viewpoint = mention + effect + rng.normal(0, 0.01, (n, u))
    run_dir = tmp_path_factory.mktemp("klein-run")
    d, t, inf = _write_run(run_dir, plan, np.vstack([viewpoint, mention]).astype(np.float32))
    report.write_report(run_dir)
    return run_dir, plan, d, t, inf


def test_report_opens_like_the_card(klein_run):
    run_dir = klein_run[0]
    text = (run_dir / "report.md").read_text()
    assert "RANDOM WEIGHTS" in text.split("## Results")[0]
    heads = ["## Results", "## Methods", "## Per block", "## Per stream and kind", "## Along the axis (creature)",
             "## Top 20 units by |t|", "## Figures", "## References", "## Provenance"]
    assert [text.index(h) for h in heads] == sorted(text.index(h) for h in heads)
    card = text.split("## Methods")[0]
    assert "| metric | observed | null mean | null p99 | observed / null p99 |" in card
    assert re.search(r"\| units with \\\|t\\\|>3 \| [\d,]+ \(\d+%\) \|", card)
    assert "| units with \\|t\\|>5 |" in card and "| max \\|t\\| |" in card
    assert "200 seeded random sign flips (seed 0)" in card
    assert "double-stream (joint MMDiT) block 2 (`transformer_blocks.2.attn.to_out.0`)" in card
    assert "It holds 20 of the 20 units with the largest |t|" in card


def test_methods_say_exactly_what_was_run(klein_run):
    methods = (klein_run[0] / "report.md").read_text().split("## Methods")[1].split("## Per block")[0]
    for expected in ["`builtin:klein-4b`, **random weights**", "A photographic kitchen scene, seen at eye level",
                     "14 steps, guidance scale 4, seed 0", "(at 1024x1024)", "1 step at guidance scale 1",
                     "1 seed(s) (0)", "every pass of a seed starts from the same noise",
                     "d = viewpoint − mention", "Per item (one creature filler, the unit of inference, N = 30)",
                     "1 an adult human; 2 a tall person", "30 an alien with non-visual senses",
                     "5 double-stream image-stream sites x 192 units (960 attention, 0 MLP), 8,192 counted tokens",
                     "20 single-stream joint-stream sites x 768 units (3,840 attention, 11,520 MLP), 8,704 counted tokens",
                     "16,320 units of 16 input channels", "512 text, 4,096 target and 4,096 reference tokens",
                     "random (200 seeded sign flips, seed 0", "Benjamini-Hochberg (1995)", "|t| > 3, 5",
                     "0.99 quantile", "10,000 permutations (the identity and 9,999 random, numpy seed 0)",
                     "noncentral t with N−1 degrees of freedom", "Hedges' g_z"]:
        assert expected in methods, expected


def test_blocks_kinds_and_axis_are_reported(klein_run):
    run_dir, plan, d, t, inf = klein_run
    text = (run_dir / "report.md").read_text()
    blocks = text.split("## Per block")[1].split("## Per stream")[0]
    rows = [line for line in blocks.splitlines() if line.startswith("| D") or line.startswith("| S")]
    assert len(rows) == 25
    assert rows[PLANTED_BLOCK].startswith("| D2 `transformer_blocks.2.attn.to_out.0` | 192 | 192 (100%) |")
    kinds = text.split("## Per stream and kind")[1].split("## Along")[0]
    for group in ("double", "single", "attention", "mlp", "single attention", "single mlp", "all"):
        assert f"| {group} | " in kinds
    summary = store.read_json(run_dir / "summary.json")
    found = sorted(u["unit"] for u in summary["analyses"][0]["axis"]["top_units"] if u["axis_p_fwer"] <= 0.05)
    assert found == AXIS_UNITS
    assert summary["analyses"][0]["groups"]["all"][0]["axis_fwer"] == len(AXIS_UNITS)
    assert "4 (0.025%) units follow the creature axis at family-wise p ≤ 0.05" in text
    # 10,000 permutations: p >= 1e-4, so BH needs 16,320 / (1e4 * 0.05) = 33 units at that p; it finds none.
    assert "and 0 (0%) at BH q ≤ 0.05" in text and "33 for the axis" in text


def test_unit_table_has_the_inference_columns(klein_run):
    run_dir, plan, d, t, inf = klein_run
    rows = store.read_csv(run_dir / "units.csv")
    assert len(rows) == 16_320
    for key in ("d_z", "d_z_low", "d_z_high", "p_uncorrected", "p_fwer", "q", "axis_rho", "axis_p", "axis_p_fwer",
                "axis_q"):
        assert key in rows[0], key
    np.testing.assert_allclose([float(r["q"]) for r in rows], inf.q, rtol=1e-15)
    np.testing.assert_allclose([float(r["axis_rho"]) for r in rows], inf.axis.rho, rtol=1e-15)
    assert all(float(r["d_z_low"]) <= float(r["d_z"]) <= float(r["d_z_high"]) for r in rows[:500])
    saved = store.read_tensors(run_dir / "inference.safetensors")
    assert saved["viewpoint_vs_mention/axis_max_null"].shape == (inference.AXIS_PERMUTATIONS,)


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_figures_are_column_width_pngs_linked_from_the_report(klein_run):
    run_dir = klein_run[0]
    text = (run_dir / "report.md").read_text()
    links = re.findall(r"!\[Figure \d\]\((figures/\w+\.png)\)", text)
    assert links == ["figures/t_map.png", "figures/null_counts.png", "figures/block_bars.png",
                     "figures/axis_units.png"]
    for link in links:
        width, height = _png_size(run_dir / link)
        assert width == figures.WIDTH * figures.DPI and 300 < height < 9 * figures.DPI, (link, width, height)
    assert min(v for k, v in figures.STYLE.items() if k.endswith("size")) >= 7


def test_report_and_figures_rerender_identically(klein_run):
    run_dir = klein_run[0]
    before = {p.name: p.read_bytes() for p in [run_dir / "report.md", *sorted((run_dir / "figures").iterdir())]}
    for p in (run_dir / "figures").iterdir():
        p.unlink()
    (run_dir / "report.md").unlink()
    report.write_report(run_dir)
    after = {p.name: p.read_bytes() for p in [run_dir / "report.md", *sorted((run_dir / "figures").iterdir())]}
    assert after == before


def test_trained_weights_have_no_banner(klein_run, tmp_path):
    run_dir = klein_run[0]
    for name in ("summary.json", "rms.safetensors", "null.safetensors"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    manifest = store.read_json(run_dir / "manifest.json")
    manifest.update(random_weights=False, model={"source": "black-forest-labs/FLUX.2-klein-base-4B"})
    store.write_json(tmp_path / "manifest.json", manifest)
    text = report.write_report(tmp_path, verify=False).read_text()  # verified, the edit would be refused
    assert "RANDOM WEIGHTS" not in text and "trained weights" in text


def test_incomplete_or_old_run_directories_say_so(klein_run, tmp_path):
    from otherview.errors import RunDirError

    with pytest.raises(RunDirError, match="no manifest.json"):
        report.write_report(tmp_path)
    run_dir = klein_run[0]
    for name in ("manifest.json", "rms.safetensors", "null.safetensors"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    (tmp_path / "summary.json").write_text(json.dumps({"card_table": []}))
    with pytest.raises(RunDirError, match=r"missing \(the manifest records it\)|does not match its recorded"):
        report.write_report(tmp_path)
    with pytest.raises(RunDirError, match="predates this otherview version"):
        report.write_report(tmp_path, verify=False)


def test_exec_writes_the_inference_files(tmp_path):
    """The interpreter's path on the tiny model: inference arrays, unit columns and figures in the run."""
    from otherview.interpreter import execute

    spec, raw = load_spec(SPECS / "pass" / "small.toml")
    run = execute(spec, raw, "small.toml", out_dir=str(tmp_path))
    saved = store.read_tensors(run / "inference.safetensors")
    axis_p = saved["viewpoint_vs_mention/axis_p"]
    assert axis_p.shape == (10,) and np.all(axis_p >= 1 / 720)  # 6! exact, identity included
    rows = store.read_csv(run / "units.csv")
    np.testing.assert_allclose([float(r["axis_p_fwer"]) for r in rows], saved["viewpoint_vs_mention/axis_p_fwer"])
    assert {p.name for p in (run / "figures").iterdir()} == {"t_map.png", "null_counts.png", "block_bars.png",
                                                             "axis_units.png"}
    assert "exact (all 720 permutations)" in (run / "report.md").read_text()
