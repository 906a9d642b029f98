"""The report: ``summary.json`` from the statistics, and ``report.md`` rendered from the run directory.

``write_report`` reads only the run directory (manifest, summary, unit table), so ``otherview report
RUN_DIR`` re-renders a report without the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import stats, store
from .plan import Plan

TOP_UNITS = 20


def summarise(plan: Plan, d: np.ndarray, t: np.ndarray, null: stats.NullSummary) -> dict[str, Any]:
    """Return the run's summary: the card's table, the per-block summary, the top units and the null used."""
    spec = plan.spec
    table = stats.card_table(t, null)
    blocks = stats.block_summary(t, plan, spec.null.thresholds)
    order = np.argsort(-np.abs(t), kind="stable")[:TOP_UNITS]
    p_unc, p_fwer = null.result.p_uncorrected, null.result.p_fwer
    top = []
    for i in order:
        u = plan.units[int(i)]
        top.append({"unit": u.index, "site": u.site, "kind": u.kind, "head": u.head, "subgroup": u.subgroup,
                    "channels": f"{u.channel_start}-{u.channel_end - 1}", "t": float(t[i]), "mean_d": float(d[:, i].mean()),
                    "p_uncorrected": float(p_unc[i]), "p_fwer": float(p_fwer[i])})
    strongest = max(blocks, key=lambda b: (b[f"over_{spec.null.thresholds[-1]:g}"], b["max_abs_t"])) if blocks else None
    return {"experiment": spec.experiment.name, "n_pairs": int(d.shape[0]), "n_units": int(d.shape[1]),
            "card_table": table, "blocks": blocks, "strongest_block": strongest, "top_units": top,
            "null": {"method": null.method, "exact": null.exact, "flips": int(null.result.n_flips),
                     "seed": spec.null.seed, "quantile": null.quantile, "thresholds": null.thresholds}}


def _fmt_count(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def _ratio(row: dict) -> str:
    if row["ratio"] is None:
        return "—" if row["threshold"] is None else "∞ (null quantile 0)"
    return f"{row['ratio']:,.0f}×" if row["ratio"] >= 10 else f"{row['ratio']:.2g}×"


def render(manifest: dict[str, Any], summary: dict[str, Any]) -> str:
    """Return ``report.md`` for a run from its manifest and summary."""
    spec = manifest["spec"]
    q = summary["null"]["quantile"]
    qname = f"p{q * 100:g}"
    lines = [f"# {spec['experiment']['name']}", ""]
    if manifest.get("random_weights"):
        lines += ["> **RANDOM WEIGHTS.** This run used a random-weight stand-in "
                  f"(`{manifest['model']['source']}`), not trained weights: its numbers test the tool, "
                  "not the model, and mean nothing about FLUX.2.", ""]
    if spec["experiment"].get("description"):
        lines += [spec["experiment"]["description"], ""]
    null = summary["null"]
    kind = (f"exact: all {null['flips']:,} sign flips" if null["exact"]
            else f"{null['flips']:,} seeded random sign flips (seed {null['seed']})")
    lines += ["## Results", "", f"| metric | observed | null mean | null {qname} | observed / null {qname} |",
              "|---|---|---|---|---|"]
    for row in summary["card_table"]:
        if row["threshold"] is None:
            lines.append(f"| max \\|t\\| | {row['observed']:.2f} | {row['null_mean']:.2f} | {row['null_q']:.2f} | — |")
        else:
            lines.append(f"| {row['metric'].replace('|', chr(92) + '|')} | {row['observed']:,} ({row['fraction']:.0%}) | "
                         f"{_fmt_count(row['null_mean'])} | {_fmt_count(row['null_q'])} | {_ratio(row)} |")
    lines += ["", f"Null: {kind}, {summary['n_pairs']} pairs, {summary['n_units']:,} units."]
    first = summary["card_table"][0]
    strongest = summary.get("strongest_block")
    lines += ["", f"{first['fraction']:.0%} of all {summary['n_units']:,} units have |t| > {first['threshold']:g} for "
              f"'{spec['contrast']['a']}' vs '{spec['contrast']['b']}', against a null {qname} of "
              f"{_fmt_count(first['null_q'])} units."]
    if strongest:
        lines.append(f"The most selective site is `{strongest['site']}` ({strongest['stream']}-stream block "
                     f"{strongest['block']}): max |t| {strongest['max_abs_t']:.2f}.")
    lines += ["", "## Per block", "", "| site | stream | units | " +
              " | ".join(f"\\|t\\|>{c:g}" for c in null["thresholds"]) + " | max \\|t\\| |",
              "|---|---|---|" + "---|" * len(null["thresholds"]) + "---|"]
    for b in summary["blocks"]:
        counts = " | ".join(f"{b[f'over_{c:g}']:,}" for c in null["thresholds"])
        lines.append(f"| `{b['site']}` | {b['stream']} | {b['units']:,} | {counts} | {b['max_abs_t']:.2f} |")
    lines += ["", f"## Top {len(summary['top_units'])} units", "",
              "| unit | site | kind | head | channels | t | mean d | p (uncorrected) | p (FWER) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for u in summary["top_units"]:
        head = "—" if u["head"] < 0 else str(u["head"])
        lines.append(f"| {u['unit']} | `{u['site']}` | {u['kind']} | {head} | {u['channels']} | {u['t']:.2f} | "
                     f"{u['mean_d']:.3g} | {u['p_uncorrected']:.3g} | {u['p_fwer']:.3g} |")
    lines += ["", "## Provenance", "", f"- spec: `{manifest.get('spec_path')}` (sha256 `{manifest['spec_hash'][:16]}…`)",
              f"- model: `{manifest['model']['source']}`" + (" (random weights)" if manifest.get("random_weights") else ""),
              f"- device: {manifest['device'].get('gpu', manifest['device']['device'])}",
              f"- otherview git sha: `{manifest.get('git_sha')}`; torch {manifest['versions'].get('torch')}, "
              f"diffusers {manifest['versions'].get('diffusers')}",
              f"- phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in manifest.get("phases", {}).items()
                                                 if k != "report")]
    if manifest.get("resolution_note"):
        lines.append(f"- resolution: {manifest['resolution'][0]}x{manifest['resolution'][1]} ({manifest['resolution_note']})")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Render ``report.md`` in ``run_dir`` from the files already there; return its path."""
    run_dir = Path(run_dir)
    for name in ("manifest.json", "summary.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir}: no {name}; is this a completed otherview run directory?")
    text = render(store.read_json(run_dir / "manifest.json"), store.read_json(run_dir / "summary.json"))
    store.atomic_write_text(run_dir / "report.md", text)
    return run_dir / "report.md"
