"""The Python API and the run directory as data, on builtin:tiny: run, load, select units, read their values.

Also: the README's column dictionary against the files a run writes, and the README's notebook
session run as written.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import otherview
from otherview.records import RunFormatError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "tests" / "specs" / "pass" / "small.toml"
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    return otherview.run(SMALL, out=out, set=["probe.batch_size=5"], null__quantile=0.9)


def test_import_is_light():
    code = "import sys, otherview; print(sorted(m for m in ('torch', 'diffusers', 'pydantic', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_plan_is_the_function_after_the_submodule_is_imported():
    from otherview.plan import build_plan  # noqa: F401  (binds the submodule in sys.modules)

    plan = otherview.plan(SMALL, model="builtin:tiny", null__flips=300)
    assert plan.spec.null.flips == 300 and plan.n_units == 10


def test_run_load_top_units_and_their_values(tiny_run):
    run = tiny_run
    assert run.manifest.status == "complete"
    assert run.manifest.overrides == ["probe.batch_size=5", "null.quantile=0.9"]
    assert run.manifest.spec["probe"]["batch_size"] == 5 and run.summary.analyses[0].null.quantile == 0.9
    assert run.manifest.layout_id == run.layout_id == run.summary.layout.id
    again = otherview.load_run(run.path)
    assert again.layout_id == run.layout_id and again.analyses == ["viewpoint_vs_mention"]

    top = run.top("viewpoint_vs_mention", n=3, kind="attention")
    assert len(top) == 3 and (top["kind"] == "attention").all()
    all_t = run.unit_table()["t"]
    attention_t = all_t[run.layout["kind"] == "attention"].abs().sort_values(ascending=False)
    assert list(top.index) == list(attention_t.index[:3])

    # per-pass values labelled by pass; the contrast per item is viewpoint - mention of them
    values = run.values(units=top.index)
    assert values.shape == (12, 3) and list(values.columns) == list(top.index)
    assert values.index.names == ["pass", "condition", "item", "item_value", "scene", "seed", "wording", "step"]
    by_condition = values.droplevel(["pass", "item", "scene", "seed", "wording", "step"])
    expected = (by_condition.xs("viewpoint", level="condition").to_numpy(np.float64)
                - by_condition.xs("mention", level="condition").to_numpy(np.float64))
    per_item = run.item_values("viewpoint_vs_mention", units=top.index)
    assert list(per_item.index) == ["a cat", "a dog", "a parrot", "a snake", "a bee", "a bat"]
    np.testing.assert_allclose(per_item.to_numpy(), expected, rtol=1e-12)

    stats = run.stats("viewpoint_vs_mention")
    np.testing.assert_allclose(stats["t"][top.index], top["t"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats["p_fwer"][top.index], top["p_fwer"].to_numpy(), rtol=1e-12)
    null = run.null("viewpoint_vs_mention")
    assert null.method == "exact" and null.n_flips == 32
    assert null.max_hist_edges.shape == (null.max_hist.shape[0] + 1,) and np.isinf(null.max_hist_edges[-1])
    assert np.all(np.diff(null.max_hist_edges) > 0) and null.max_hist.sum() == null.n_flips
    np.testing.assert_allclose(null.exceed / null.n_flips, stats["p_uncorrected"])
    assert "RANDOM WEIGHTS" in repr(run) and "viewpoint_vs_mention" in run._repr_html_()


def test_no_sentinels_one_meaning_per_name(tiny_run):
    layout = tiny_run.layout
    mlp = layout[layout["kind"] == "mlp"]
    assert len(mlp) and mlp["head"].isna().all()
    assert set(layout["kind"]) == {"attention", "mlp"}
    assert set(layout["stream_kind"]) == {"image", "joint"}
    assert ((layout["channel_end"] - layout["channel_start"]) == 16).all()  # half-open
    top = tiny_run.summary.analyses[0].top_units
    assert all(u.head is None for u in top if u.kind == "mlp")
    assert all(u.channels == f"[{u.channel_start}, {u.channel_end})" for u in top)
    report = (tiny_run.path / "report.md").read_text()
    assert "16-channel" not in report and "x 6 items (animal fillers)" in report


def _dictionary(heading: str) -> list[str]:
    """Return the first-column names of the README table under ``### `heading```."""
    section = README.split(f"### `{heading}`\n")[1].split("\n### ")[0].split("\n## ")[0]
    names = []
    for line in section.splitlines():
        cell = line.split("|")[1].strip() if line.startswith("| `") else None
        if cell:
            names += re.findall(r"`([^`]+)`", cell)
    return names


def _keys(path: Path, analysis: str) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {k.replace(f"{analysis}/", "<analysis>/") for k in f.keys()}


def test_column_dictionary_matches_the_files_written(tiny_run):
    import csv

    run_dir, key = tiny_run.path, tiny_run.analyses[0]
    for name in ("units.csv", "passes.csv"):
        with open(run_dir / name) as f:
            header = next(csv.reader(f))
        assert header == _dictionary(name), name
    for name in ("rms.safetensors", "null.safetensors", "inference.safetensors"):
        documented = {k for k in _dictionary(name) if not k.startswith("<specificity>")}
        assert _keys(run_dir / name, key) == documented, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == set(_dictionary("summary.json"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    documented = set(_dictionary("manifest.json"))
    assert set(manifest) <= documented, set(manifest) - documented
    assert {"status", "spec", "overrides", "layout_id", "seeds", "versions"} <= set(manifest)


def test_specificity_verdicts_are_documented():
    assert "<specificity>/passed" in _dictionary("rms.safetensors")


def test_load_run_names_what_is_wrong(tmp_path, tiny_run):
    with pytest.raises(RunFormatError, match="no such run directory"):
        otherview.load_run(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(RunFormatError, match="manifest.json: status"):
        otherview.load_run(tmp_path)
    bad = tmp_path / "old"
    bad.mkdir()
    (bad / "manifest.json").write_text((tiny_run.path / "manifest.json").read_text())
    summary = json.loads((tiny_run.path / "summary.json").read_text())
    (bad / "summary.json").write_text(json.dumps(summary | {"schema_version": 2}))
    with pytest.raises(RunFormatError, match="schema version 2"):
        otherview.load_run(bad)


def _readme_session() -> str:
    section = README.split("## Python API")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_notebook_session_runs_as_written(tmp_path):
    """The README's script, run from the repository's root as it says; its run directory is removed after."""
    script = tmp_path / "session.py"
    script.write_text(_readme_session() + "\nprint('RUN_DIR', run.path)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    run_dir = re.search(r"RUN_DIR (.+)", out.stdout)
    try:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "viewpoint_vs_mention" in out.stdout and "a cat" in out.stdout
        assert "p_fwer" in out.stdout and "condition" in out.stdout
    finally:
        if run_dir:
            import shutil

            shutil.rmtree(run_dir.group(1), ignore_errors=True)
            for folder in (Path(run_dir.group(1)).parent, Path(run_dir.group(1)).parent.parent):
                try:
                    folder.rmdir()  # only when empty: a user's earlier runs stay
                except OSError:
                    pass


def test_run_tables_keep_text_as_written_and_read_nan_and_inf(tmp_path):
    from otherview.runs import _read_csv

    path = tmp_path / "t.csv"
    path.write_text("condition,head,t,tokens\nNA,,nan,\nNone,3,inf,12\n")
    table = _read_csv(path, text=("condition",), optional_int=("head", "tokens"))
    assert list(table["condition"]) == ["NA", "None"]
    assert table["head"].isna().tolist() == [True, False] and table["tokens"].dtype == "Int64"
    assert np.isnan(table["t"][0]) and np.isinf(table["t"][1])
