"""Never a confident wrong report: every broken input gives its exit code and a message naming the file, no traceback.

Broken specs, images, output paths, model folders and run directories are made here from
``tests/specs/pass/small.toml``; each case names the command, the expected exit code and the
fragments its message must hold.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from otherview.cli import main

SPECS = Path(__file__).resolve().parent / "specs"
SMALL = (SPECS / "pass" / "small.toml").read_text()
PROMPT = 'prompt = "A photographic kitchen scene, no people present"'


def _fillers(n: int) -> str:
    return "fillers = [\n" + "".join(f'  {{ value = "creature {i}", rank = {i} }},\n' for i in range(n)) + "]\n"


def _with_fillers(text: str, n: int) -> str:
    start = text.index("fillers = [")
    end = text.index("]\n", start) + 2
    return text[:start] + _fillers(n) + text[end:]


# (name, command, spec edit (old, new) pairs or a function, exit code, message fragments)
CASES = [
    ("steps_true", "validate", [("steps = 1\n", "steps = true\n")], 2, ["probe.steps: should be an integer"]),
    ("steps_string", "validate", [("steps = 1\n", 'steps = "3"\n')], 2, ["probe.steps: should be an integer"]),
    ("name_dotdot", "validate", [('name = "small"', 'name = ".."')], 2, ["experiment.name"]),
    ("mps_here", "validate", [('device = "cpu"', 'device = "mps"')], 3, ["model.device: 'mps'"]),
    ("cuda_absent", "plan", [('device = "cpu"', 'device = "cuda"')], 3, ["model.device: 'cuda'", "no CUDA"]),
    ("flash_on_cpu", "plan", [("[capture]", '[runtime]\nattention_backend = "flash"\n\n[capture]')], 2,
     ["runtime.attention_backend: 'flash' needs a CUDA device"]),
    ("unknown_compile_backend", "validate", [("[capture]", '[runtime]\ncompile_backend = "warp"\n\n[capture]')], 2,
     ["runtime.compile_backend: unknown torch.compile backend 'warp'"]),
    ("exact_41_fillers", "plan", lambda t: _with_fillers(t, 41), 2, ["null.method: exact enumerates 2^(N-1) flips and accepts at most 40"]),
    ("exact_too_long", "plan", lambda t: _with_fillers(t, 40).replace("unit_width = 16", "unit_width = 1"), 2,
     ["null.method: the exact null", "would take about", "method = 'random'"]),
    ("random_null_too_long", "plan", [('source = "builtin:tiny"', 'source = "builtin:klein-4b"'),
                                      ('method = "exact"', 'method = "random"\nflips = 1000000000')], 2,
     ["null.flips: 1,000,000,000 random flips x 16,320 units", "use fewer flips"]),
    ("image_not_an_image", "validate", [(PROMPT, 'image = "notes.png"')], 2,
     ["reference.image: ", "is not a readable image"]),
    ("image_truncated", "validate", [(PROMPT, 'image = "cut.png"')], 2, ["reference.image: ", "cut.png"]),
    ("output_is_a_file", "validate", [("[null]", '[output]\ndir = "blocker/{name}"\n\n[null]')], 2,
     ["output.dir: ", "is a file, not a directory"]),
    ("text_encoder_layers_count", "validate", [('max_sequence_length = 128', 'max_sequence_length = 128\n'
                                                'text_encoder_out_layers = [1]')], 2,
     ["model.text_encoder_out_layers: 1 layers x hidden size"]),
    ("text_encoder_layers_range", "validate", [('max_sequence_length = 128', 'max_sequence_length = 128\n'
                                                'text_encoder_out_layers = [1, 2, 999]')], 2,
     ["model.text_encoder_out_layers: [999] beyond"]),
    ("several_at_once", "exec", [(PROMPT, 'image = "missing.png"'), ('device = "cpu"', 'device = "mps"'),
                                 ("[null]", '[output]\ndir = "blocker/{name}"\n\n[null]')], 2,
     ["reference.image: no such file", "model.device: 'mps'", "output.dir: "]),
]


@pytest.fixture()
def workdir(tmp_path):
    """A folder with the files the cases point at: a text file named .png, a truncated PNG, a file in the way."""
    from PIL import Image

    (tmp_path / "notes.png").write_text("not an image\n")
    Image.new("RGB", (64, 64), (90, 120, 30)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    (tmp_path / "blocker").write_text("a file where the output folder should go\n")
    return tmp_path


def _spec(workdir: Path, name: str, edit) -> Path:
    text = SMALL
    if callable(edit):
        text = edit(text)
    else:
        for old, new in edit:
            assert old in text, old
            text = text.replace(old, new)
    text = text.replace('dir = "blocker', f'dir = "{workdir}/blocker')
    path = workdir / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name,command,edit,code,fragments", CASES, ids=[c[0] for c in CASES])
def test_broken_inputs_give_their_exit_code_and_name_the_file(runner, workdir, name, command, edit, code, fragments):
    spec = _spec(workdir, name, edit)
    args = [command, str(spec)] + (["--out", str(workdir / "runs")] if command == "exec" and "blocker" not in
                                   spec.read_text() else [])
    result = runner.invoke(main, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, TypeError))
    for line in result.output.strip().splitlines():
        assert line.startswith(str(spec)), line  # every problem names the file
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not (workdir / "runs").exists()  # refused before any run directory was made


def test_validate_dev_zero_is_refused_quickly(runner):
    result = runner.invoke(main, ["validate", "/dev/zero"])
    assert result.exit_code == 2 and "/dev/zero: larger than" in result.output


def test_plan_at_1200_fillers_neither_crashes_nor_overflows(runner, tmp_path):
    spec = tmp_path / "many.toml"
    spec.write_text(_with_fillers(SMALL, 1200).replace('method = "exact"', 'method = "auto"'))
    result = runner.invoke(main, ["plan", str(spec)])
    assert result.exit_code == 0, result.output
    assert "null method on this machine (cpu): random" in result.output
    assert "unit-flips (exact, per analysis): " in result.output


@pytest.mark.parametrize("config", ["{", "{}", ""])
def test_a_model_folder_with_a_broken_config_is_unavailable(runner, tmp_path, config):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(config)
    result = runner.invoke(main, ["plan", str(SPECS / "pass" / "small.toml"), "--model", str(folder)])
    assert result.exit_code == 3, result.output
    assert "model.source: " in result.output and str(folder) in result.output and "Traceback" not in result.output


def test_random_weights_survive_losing_the_marker(tiny_folder, tmp_path):
    """Provenance is in the weights' own metadata: a copy without otherview.json is still random weights."""
    import shutil

    from otherview.model import architecture

    copy = tmp_path / "copy"
    shutil.copytree(tiny_folder, copy)
    (copy / "otherview.json").unlink()
    assert architecture(str(copy)).random_weights is True


def test_strict_json_and_canonical_safetensors(tmp_path):
    from otherview import store

    store.write_json(tmp_path / "a.json", {"t": [1.0, float("inf"), float("-inf")], "x": {"y": float("nan")}})
    text = (tmp_path / "a.json").read_text()
    assert "Infinity" not in text.replace('"Infinity"', "").replace('"-Infinity"', "") and "NaN" not in \
        text.replace('"NaN"', "")
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    back = store.read_json(tmp_path / "a.json")
    assert back["t"][1] == np.inf and back["t"][2] == -np.inf and np.isnan(back["x"]["y"])
    arrays = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2))}
    one = store.safetensors_bytes(arrays, {"z": "1", "a": "2", "m": "3"})
    two = store.safetensors_bytes(dict(reversed(arrays.items())), {"m": "3", "a": "2", "z": "1"})
    assert one == two
    store.write_tensors(tmp_path / "x.safetensors", arrays, {"z": "1"})
    loaded = store.read_tensors(tmp_path / "x.safetensors")
    assert np.array_equal(loaded["a"], arrays["a"]) and store.tensors_metadata(tmp_path / "x.safetensors") == {"z": "1"}


def test_run_directory_names_stay_inside_the_output_directory(tmp_path):
    from otherview import store

    for name in ("..", "a/b", "."):
        with pytest.raises(ValueError, match="would leave the output directory"):
            store.new_run_dir(tmp_path, name)


# --- NaN and inf ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_folder(tmp_path_factory):
    """The tiny model saved, then one attention projection's weight overwritten with NaN."""
    from safetensors.numpy import load_file, save_file

    from otherview import store
    from otherview.model import save_builtin

    folder = save_builtin("tiny", tmp_path_factory.mktemp("nan-model") / "pipeline")
    path = next((folder / "transformer").glob("*.safetensors"))
    meta = store.tensors_metadata(path)
    weights = load_file(str(path))
    key = next(k for k in weights if k.endswith("transformer_blocks.0.attn.to_q.weight"))
    weights[key] = np.full_like(weights[key], np.nan)
    save_file(weights, str(path), metadata=meta)
    return folder


def _failed_manifest(out: Path) -> dict:
    run = next(out.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed", manifest["status"]
    return manifest


def test_nan_activations_end_the_run_naming_site_pass_condition_and_item(runner, nan_folder, workdir):
    spec = _spec(workdir, "from_file", [(PROMPT, 'image = "ok.png"')])
    result = runner.invoke(main, ["exec", str(spec), "--model", str(nan_folder), "--out", str(workdir / "runs")])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    for fragment in ("non-finite activations", "at site ", "pass 0", "condition 'viewpoint'", "item 'a cat'",
                     "status failed"):
        assert fragment in result.output, result.output
    manifest = _failed_manifest(workdir / "runs")
    assert "non-finite activations" in manifest["error"] and "report" not in manifest["phases_done"]


def test_a_nan_reference_image_is_refused_not_saved_black(runner, nan_folder, tmp_path):
    result = runner.invoke(main, ["exec", str(SPECS / "pass" / "small.toml"), "--model", str(nan_folder),
                                  "--out", str(tmp_path / "runs")])
    assert result.exit_code == 3, result.output
    assert "reference image of scene 'scene' came out NaN or inf" in result.output
    assert "Traceback" not in result.output
    manifest = _failed_manifest(tmp_path / "runs")
    assert "reference" not in manifest["phases_done"]
    assert not (next((tmp_path / "runs").iterdir()) / "reference.png").exists()


def test_text_encoder_out_layers_are_applied_not_ignored(runner, tmp_path):
    spec = tmp_path / "layers.toml"
    spec.write_text(SMALL.replace("max_sequence_length = 128", "max_sequence_length = 128\n"
                                  "text_encoder_out_layers = [0, 1, 2]"))
    result = runner.invoke(main, ["plan", str(spec)])
    assert result.exit_code == 0, result.output
    assert "text encoder states stacked: 0, 1, 2 (model.text_encoder_out_layers)" in result.output
