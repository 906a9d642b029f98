"""``otherview exec`` end to end on the tiny model, the from_pretrained path, and the run directory."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from otherview.cli import main
from otherview.store import read_csv, read_tensors

SPECS = Path(__file__).resolve().parent / "specs"
ROOT = Path(__file__).resolve().parents[1]


def _exec(runner, spec, tmp_path, *extra):
    result = runner.invoke(main, ["exec", str(spec), "--out", str(tmp_path / "runs"), *extra])
    assert result.exit_code == 0, result.output
    return Path(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from click.testing import CliRunner

    return _exec(CliRunner(), SPECS / "pass" / "small.toml", tmp_path_factory.mktemp("exec"))


def test_run_directory_is_complete(small_run):
    names = {p.name for p in small_run.iterdir()}
    assert {"manifest.json", "reference.png", "rms.safetensors", "null.safetensors", "units.csv", "summary.json",
            "report.md", "passes.csv"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    manifest = json.loads((small_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["random_weights"] is True
    assert manifest["spec_text"] == (SPECS / "pass" / "small.toml").read_text()
    assert len(manifest["spec_hash"]) == 64 and manifest["seeds"] == {"reference": [1], "probe": [0], "null": 0}
    assert manifest["versions"]["torch"] and manifest["device"]["device"] == "cpu"
    null = manifest["null"]["viewpoint_vs_mention"]
    assert null["exact"] is True and null["flips"] == 2 ** 5


def test_arrays_and_table_agree(small_run):
    arrays = read_tensors(small_run / "rms.safetensors")
    rms, d, t = arrays["rms"], arrays["viewpoint_vs_mention/d"], arrays["viewpoint_vs_mention/t"]
    assert rms.shape == (12, 10) and np.all(rms > 0) and np.all(np.isfinite(rms))
    np.testing.assert_allclose(d, rms[:6].astype(np.float64) - rms[6:], rtol=1e-12)
    rows = read_csv(small_run / "units.csv")
    assert len(rows) == 10 and rows[0]["site"] == "transformer_blocks.0.attn.to_out.0"
    assert {r["analysis"] for r in rows} == {"viewpoint_vs_mention"}
    passes = read_csv(small_run / "passes.csv")
    assert len(passes) == 12 and [int(r["row"]) for r in passes] == list(range(12))
    assert passes[0]["condition"] == "viewpoint" and passes[6]["condition"] == "mention"
    assert passes[0]["item_value"] == "a cat" and passes[0]["step"] == "mean"
    assert passes[0]["prompt"] == "Render this kitchen from the viewpoint of a cat" and int(passes[0]["tokens"]) > 40
    np.testing.assert_allclose([float(r["t"]) for r in rows], t, rtol=1e-12)
    assert {r["kind"] for r in rows} == {"attention", "mlp"}
    p = np.array([float(r["p_uncorrected"]) for r in rows])
    assert np.all(p >= 1 / 32) and np.all(p <= 1)  # the identity is part of the null: no p is 0


def test_report_says_random_weights_and_has_the_card_table(small_run):
    text = (small_run / "report.md").read_text()
    assert "RANDOM WEIGHTS" in text.split("## Results")[0]
    assert "| units with \\|t\\|>2 |" in text and "| max \\|t\\| |" in text
    assert "exact: all 32 sign flips" in text


def test_manifest_and_report_say_how_each_auto_was_resolved(small_run):
    from otherview import capture

    runtime = json.loads((small_run / "manifest.json").read_text())["runtime"]
    want = capture.resolved_kernel("auto", torch.device("cpu"))
    assert runtime["capture_kernel"] == "auto" and runtime["capture_kernel_resolved"] == want
    assert runtime["compile_decision"]["setting"] == "auto" and runtime["compile"] is False
    assert "bytecode_cache" in runtime  # None here: this install has bytecode
    line = next(ln for ln in (small_run / "report.md").read_text().splitlines() if ln.startswith("- runtime:"))
    assert f"capture kernel auto -> {want}" in line and line.startswith("- runtime: eager (auto: cpu device")


def test_report_rerenders_without_the_model(runner, small_run):
    before = (small_run / "report.md").read_text()
    (small_run / "report.md").unlink()
    result = runner.invoke(main, ["report", str(small_run)])
    assert result.exit_code == 0, result.output
    assert (small_run / "report.md").read_text() == before


def test_same_spec_same_numbers(runner, small_run, tmp_path):
    again = _exec(runner, SPECS / "pass" / "small.toml", tmp_path)
    a, b = read_tensors(small_run / "rms.safetensors"), read_tensors(again / "rms.safetensors")
    assert np.array_equal(a["rms"], b["rms"])


def test_exec_checks_each_spec_once_and_clocks_the_load(runner, monkeypatch, tmp_path):
    """The CLI's pre-weights checks are not made again by the run; the manifest says when the weights began."""
    from otherview import checks

    calls = []
    real = checks.preflight
    monkeypatch.setattr(checks, "preflight", lambda *args, **kw: calls.append(args[1]) or real(*args, **kw))
    run = _exec(runner, SPECS / "pass" / "small.toml", tmp_path)
    assert calls == [str(SPECS / "pass" / "small.toml")]
    clock = json.loads((run / "manifest.json").read_text())["model"]["load_clock"]  # seconds since process start
    assert 0 < clock["started_s"] <= clock["weights_started_s"] <= clock["done_s"]


def test_from_pretrained_local_folder(runner, tiny_folder, small_run, tmp_path):
    """The real loading path: a pipeline saved with save_pretrained, loaded by from_pretrained."""
    run = _exec(runner, SPECS / "pass" / "small.toml", tmp_path, "--model", str(tiny_folder))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["source"] == str(tiny_folder)
    assert manifest["random_weights"] is True  # the saved folder carries the built-in marker
    # Same seeded weights, saved and loaded: the same numbers as the built-in model.
    a, b = read_tensors(small_run / "rms.safetensors"), read_tensors(run / "rms.safetensors")
    np.testing.assert_allclose(a["rms"], b["rms"], rtol=1e-5)


def test_unavailable_hub_model_names_the_fix(runner, tmp_path):
    result = runner.invoke(main, ["exec", str(SPECS / "pass" / "small.toml"), "--out", str(tmp_path),
                                  "--model", "black-forest-labs/FLUX.2-klein-base-4B"])
    assert result.exit_code == 3
    assert "builtin:klein-4b" in result.output and "local" in result.output
    assert "Traceback" not in result.output


def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "otherview", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for command in ("exec", "validate", "plan", "schema", "report"):
        assert command in out.stdout


def test_batched_compiled_path_matches_eager_batch_of_one(tmp_path, monkeypatch):
    """Cross-path check: batch 4 under torch.compile vs batch 1 eager give the same per-unit RMS."""
    from otherview.interpreter import execute
    from otherview.spec import load_spec, with_overrides

    monkeypatch.setenv("OTHERVIEW_CACHE", str(tmp_path / "cache"))  # compile markers stay out of ~/.cache
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    spec, raw = load_spec(SPECS / "pass" / "small.toml")
    eager = with_overrides(spec, {"probe.batch_size": 1, "runtime.compile": "off"})
    # aot_eager traces the hooks and the capture op into one graph like inductor does, without
    # inductor's minute of C++ compilation on this CPU; the device check runs inductor at full scale.
    compiled = with_overrides(spec, {"probe.batch_size": 4, "runtime.compile": "on",
                                     "runtime.compile_backend": "aot_eager"})
    a = execute(eager, raw, "small.toml", out_dir=str(tmp_path / "a"))
    b = execute(compiled, raw, "small.toml", out_dir=str(tmp_path / "b"))
    ra, rb = read_tensors(a / "rms.safetensors")["rms"], read_tensors(b / "rms.safetensors")["rms"]
    np.testing.assert_allclose(rb, ra, rtol=2e-5, atol=1e-7)
    manifest = json.loads((b / "manifest.json").read_text())
    decision = manifest["runtime"]["compile_decision"]
    assert manifest["runtime"]["compile"] is True and decision["compile"] and decision["mode"] == "regional"


def test_text_encoder_runs_only_needed_layers_with_identical_states():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from otherview.model import only_needed_layers

    torch.manual_seed(0)
    encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                           vocab_size=300)).eval()
    ids = torch.randint(0, 300, (2, 10))
    run = lambda: encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,  # noqa: E731
                          use_cache=False).hidden_states
    with torch.no_grad():
        full = run()
        with only_needed_layers(encoder, 3):
            assert len(encoder.model.layers) == 4
            lean = run()
    assert len(encoder.model.layers) == 6
    assert all(torch.equal(full[k], lean[k]) for k in range(4))


def test_reference_image_from_a_file_beside_the_spec(runner, small_run, tmp_path):
    """A spec may give the reference as an image file (relative to the spec's folder) instead of a prompt."""
    import shutil

    text = (SPECS / "pass" / "small.toml").read_text()
    text = text.replace('prompt = "A photographic kitchen scene, no people present"', 'image = "kitchen.png"')
    shutil.copy(small_run / "reference.png", tmp_path / "kitchen.png")
    (tmp_path / "from_file.toml").write_text(text)
    run = _exec(runner, tmp_path / "from_file.toml", tmp_path)
    # The same image as the generated reference gives the same probe numbers.
    a, b = read_tensors(small_run / "rms.safetensors"), read_tensors(run / "rms.safetensors")
    np.testing.assert_allclose(a["rms"], b["rms"], rtol=1e-6)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["spec"]["reference"]["image"] == str(tmp_path / "kitchen.png")
    (tmp_path / "kitchen.png").unlink()
    result = runner.invoke(main, ["exec", str(tmp_path / "from_file.toml"), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "reference.image: no such file" in result.output


def test_unknown_attention_backend_is_a_spec_error(runner, tmp_path):
    result = runner.invoke(main, ["exec", str(SPECS / "pass" / "small.toml"), "--out", str(tmp_path),
                                  "--attention-backend", "warp-speed"])
    assert result.exit_code == 2
    assert "runtime.attention_backend: unknown backend 'warp-speed'" in result.output


def test_a_crash_leaves_a_run_directory_that_says_how_far_it_got(tmp_path, monkeypatch):
    from otherview import interpreter, stats
    from otherview.spec import load_spec

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the null")

    monkeypatch.setattr(stats, "sign_flip_null", boom)
    spec, raw = load_spec(SPECS / "pass" / "small.toml")
    with pytest.raises(RuntimeError, match="simulated crash"):
        interpreter.execute(spec, raw, "small.toml", out_dir=str(tmp_path))
    run = next(tmp_path.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "simulated crash" in manifest["error"]
    assert "probe" in manifest["phases"]
    assert read_tensors(run / "rms.safetensors")["rms"].shape == (12, 10)  # the probes are not lost
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
