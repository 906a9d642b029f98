"""The report: ``summary.json`` from the statistics, and ``report.md`` plus figures from the run directory.

``write_report`` reads only the run directory (manifest, summary, arrays), so ``otherview report
RUN_DIR`` re-renders the report and its figures without the model. The report opens in the form of
the otherview-plantain model card (its Results table and the sentence it draws), then says exactly
what was run (Methods, generated from the resolved spec), then the results per block, per kind and
along the axis, the top units, and the figures.

``text`` holds the tables and their formats, ``methods`` the Methods and Provenance in words; this
module renders and writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import causal_report
from .. import figures as figures_mod
from .. import store
from ..summary import summarise  # noqa: F401  (the report's data; kept importable from here)
from .methods import REFERENCES, _memory_line, _methods, _runtime_line
from .text import _card, _replication, _results, _specificity


def render(manifest: dict[str, Any], summary: dict[str, Any], figures: list[figures_mod.Figure]) -> str:
    """Return ``report.md`` for a run from its manifest, summary and figures."""
    spec = manifest["spec"]
    lines = [f"# {spec['experiment']['name']}", ""]
    if manifest.get("random_weights"):
        lines += ["> **RANDOM WEIGHTS.** This run used a random-weight stand-in "
                  f"(`{manifest['model']['source']}`), not trained weights: its numbers test the tool, "
                  "not the model, and mean nothing about FLUX.2.", ""]
    if spec["experiment"].get("description"):
        lines += [spec["experiment"]["description"], ""]
    for w in summary.get("warnings", []):
        lines += [f"> Warning: {w}", ""]
    for s in summary["specificity"]:
        lines += _specificity(summary, s) + [""]
    analyses = summary["analyses"]
    single = len(analyses) == 1
    for a in analyses:
        step = "" if a["step"] is None else f", step {a['step']}"
        heading = "## Results" if single else f"## Contrast {a['contrast']}{step}: {a['label']}"
        lines += _card(summary, a, heading) + [""]
        if not single:
            lines += _results(summary, a, 3) + [""]
    lines += _replication(summary)
    lines += _methods(manifest, summary)
    if single:
        lines += _results(summary, analyses[0], 2)
    lines += ["", "## Figures", ""]
    for k, fig in enumerate(figures, 1):
        lines += [f"![Figure {k}]({fig.path})", "", f"**Figure {k}.** {fig.caption}", ""]
    lines += ["## References", ""] + [f"- {r}" for r in REFERENCES]
    lines += ["", "## Provenance", "", f"- spec: `{manifest.get('spec_path')}` (sha256 `{manifest['spec_hash'][:16]}…`)",
              f"- model: `{manifest['model']['source']}`" + (" (random weights)" if manifest.get("random_weights") else ""),
              f"- otherview git sha: `{manifest.get('git_sha')}`; torch {manifest['versions'].get('torch')}, "
              f"diffusers {manifest['versions'].get('diffusers')}, numpy {manifest['versions'].get('numpy')}",
              "- phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in manifest.get("phases", {}).items()
                                            if k != "report")]
    lines += _memory_line(manifest) + _runtime_line(manifest)
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, workers=None, verify: bool = True) -> Path:
    """Render ``report.md`` and its figures in ``run_dir`` from the files already there; return its path.

    ``workers`` is a pool from ``figures.start_workers`` (forked early by ``exec``); without one the
    figures get a pool of their own. ``verify`` first checks the run's recorded hashes
    (``store.verify_run``): a run directory edited or corrupted since it was written is refused
    with ``RunDirError``, never reported.
    """
    from ..errors import RunDirError

    run_dir = Path(run_dir)
    manifest = store.read_manifest(run_dir)
    for name in ("summary.json", "rms.safetensors", "null.safetensors"):
        if not (run_dir / name).exists():
            raise RunDirError(f"no {name}; is this a completed run directory of this otherview version? (re-run "
                              "`otherview exec` to write one)", source=str(run_dir))
    if verify:
        store.verify_run(run_dir, manifest)
    try:
        summary = store.read_json(run_dir / "summary.json")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunDirError(f"summary.json is corrupt ({exc})", source=str(run_dir)) from None
    if not isinstance(summary, dict) or "analyses" not in summary:
        raise RunDirError("summary.json predates this otherview version's designs; re-run `otherview exec`",
                          source=str(run_dir))
    figures = figures_mod.write_figures(run_dir, manifest, summary, workers)
    store.atomic_write_text(run_dir / "report.md", causal_report.with_causal(run_dir, render(manifest, summary, figures)))
    return run_dir / "report.md"
