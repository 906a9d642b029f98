"""The report: ``summary.json`` from the statistics, and ``report.md`` plus figures from the run directory.

``write_report`` reads only the run directory (manifest, summary, arrays), so ``otherview report
RUN_DIR`` re-renders the report and its figures without the model. The report opens in the form of
the otherview-plantain model card (its Results table and the sentence it draws), then says exactly
what was run (Methods, generated from the resolved spec), then the results per block, per kind and
along the axis, the top units, and the figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from . import figures as figures_mod
from . import inference, stats, store
from .plan import Plan

TOP_UNITS = 20
TOP_AXIS = 10
REFERENCES = [
    "Benjamini, Y. & Hochberg, Y. (1995). Controlling the false discovery rate. J. R. Stat. Soc. B 57, 289-300.",
    "Hedges, L. V. & Olkin, I. (1985). Statistical Methods for Meta-Analysis, ch. 5. Academic Press.",
    "Goulet-Pelletier, J.-C. & Cousineau, D. (2018). A review of effect sizes and their confidence intervals, "
    "part I: the Cohen's d family. Quant. Methods Psychol. 14, 242-265.",
    "Nichols, T. E. & Holmes, A. P. (2002). Nonparametric permutation tests for functional neuroimaging. "
    "Hum. Brain Mapp. 15, 1-25.",
    "Westfall, P. H. & Young, S. S. (1993). Resampling-Based Multiple Testing. Wiley.",
    "Pitman, E. J. G. (1937). Significance tests which may be applied to samples from any populations. II. "
    "The correlation coefficient test. J. R. Stat. Soc. Suppl. 4, 225-232.",
]


def _unit_record(plan: Plan, i: int, d: np.ndarray, t: np.ndarray, inf: inference.UnitInference) -> dict:
    u = plan.units[i]
    site = next(s for s in plan.sites if s.name == u.site)
    return {"unit": u.index, "site": u.site, "label": inference.site_label(site.stream, site.block, site.kind),
            "kind": u.kind, "head": u.head, "subgroup": u.subgroup, "channels": f"{u.channel_start}-{u.channel_end - 1}",
            "t": float(t[i]), "mean_d": float(d[:, i].mean()), "d_z": float(inf.d_z[i]),
            "d_z_low": float(inf.d_z_low[i]), "d_z_high": float(inf.d_z_high[i]),
            "p_uncorrected": float(inf.p_uncorrected[i]), "p_fwer": float(inf.p_fwer[i]), "q": float(inf.q[i]),
            "axis_rho": float(inf.axis.rho[i]), "axis_p": float(inf.axis.p_uncorrected[i]),
            "axis_p_fwer": float(inf.axis.p_fwer[i]), "axis_q": float(inf.axis_q[i])}


def _layout(plan: Plan) -> dict[str, Any]:
    g = plan.spec.capture.unit_width
    return {"unit_width": g, "tokens": plan.spec.capture.tokens, "text_tokens": plan.text_tokens,
            "target_tokens": plan.target_tokens, "reference_tokens": plan.reference_tokens,
            "sites": [{"name": s.name, "label": inference.site_label(s.stream, s.block, s.kind), "stream": s.stream,
                       "block": s.block, "kind": s.kind, "unit_offset": s.unit_offset, "n_units": s.n_units,
                       "attention_units": s.attention_width // g, "counted_tokens": s.segment[1] - s.segment[0],
                       "tokens": s.tokens} for s in plan.sites]}


def summarise(plan: Plan, d: np.ndarray, t: np.ndarray, null: stats.NullSummary,
              inf: inference.UnitInference) -> dict[str, Any]:
    """Return the run's summary: the card's table, the layout, group counts, top units, the axis and the nulls."""
    spec = plan.spec
    groups = inference.group_summaries(plan, t, inf)
    strongest = inference.strongest_site(groups["sites"], spec.null.thresholds)
    by_t = np.argsort(-np.abs(t), kind="stable")[:TOP_UNITS]
    by_axis = np.lexsort((-np.abs(inf.axis.rho), inf.axis.p_uncorrected, inf.axis.p_fwer))[:TOP_AXIS]
    top = [_unit_record(plan, int(i), d, t, inf) for i in by_t]
    labels = [r["label"] for r in top]
    cluster = max(dict.fromkeys(labels), key=labels.count) if labels else None
    share = {r["label"]: r["units"] / max(d.shape[1], 1) for r in groups["sites"]}
    axis = inf.axis
    return {"experiment": spec.experiment.name, "n_pairs": int(d.shape[0]), "n_units": int(d.shape[1]),
            "alpha": inference.ALPHA, "ci_level": inference.CI_LEVEL, "card_table": stats.card_table(t, null),
            "layout": _layout(plan), "groups": groups, "strongest_block": strongest,
            "top_cluster": {"label": cluster, "count": labels.count(cluster) if cluster else 0, "of": len(top),
                            "expected": len(top) * share.get(cluster, 0.0)},
            "top_units": top,
            "axis": {"name": spec.axis.name, "fillers": [f.value for f in spec.axis.fillers], "ranks": spec.ranks(),
                     "n_permutations": axis.n_permutations, "exact": axis.exact, "seed": axis.seed,
                     "max_null_q": float(np.quantile(axis.max_null, 1 - inference.ALPHA)),
                     "top_units": [_unit_record(plan, int(i), d, t, inf) for i in by_axis]},
            "null": {"method": null.method, "exact": null.exact, "flips": int(null.result.n_flips),
                     "seed": spec.null.seed, "quantile": null.quantile, "thresholds": null.thresholds}}


def _fmt_count(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def _ratio(row: dict) -> str:
    if row["ratio"] is None:
        return "—" if row["threshold"] is None else "∞ (null quantile 0)"
    return f"{row['ratio']:,.0f}×" if row["ratio"] >= 10 else f"{row['ratio']:.2g}×"


def _n(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _bh_floor(m: int, resamples: int, alpha: float) -> int:
    """Return the fewest units that must share p = 1/resamples for BH to reject any of m at alpha."""
    return max(1, math.ceil(m / (resamples * alpha) - 1e-9))


def _pct(n: int, of: int) -> str:
    if not of:
        return f"{n:,}"
    share = n / of
    return f"{n:,} ({share * 100:.2g}%)" if 0 < share < 0.01 else f"{n:,} ({share:.0%})"


def _block_name(row: dict) -> str:
    if row["stream"] == "single":
        return f"single-stream block {row['block']}"
    return f"double-stream (joint MMDiT) block {row['block']}" + (" text stream" if row["kind"] == "text" else "")


def _card(manifest: dict, summary: dict) -> list[str]:
    spec, null = manifest["spec"], summary["null"]
    qname = f"p{null['quantile'] * 100:g}"
    kind = (f"exact: all {null['flips']:,} sign flips" if null["exact"]
            else f"{null['flips']:,} seeded random sign flips (seed {null['seed']})")
    lines = ["## Results", "", f"| metric | observed | null mean | null {qname} | observed / null {qname} |",
             "|---|---|---|---|---|"]
    for row in summary["card_table"]:
        if row["threshold"] is None:
            lines.append(f"| max \\|t\\| | {row['observed']:.2f} | {row['null_mean']:.2f} | {row['null_q']:.2f} | — |")
        else:
            lines.append(f"| {row['metric'].replace('|', chr(92) + '|')} | {row['observed']:,} ({row['fraction']:.0%}) | "
                         f"{_fmt_count(row['null_mean'])} | {_fmt_count(row['null_q'])} | {_ratio(row)} |")
    n, alpha = summary["n_units"], summary["alpha"]
    lines += ["", f"Null: {kind}, {summary['n_pairs']} pairs, {n:,} units.", ""]
    rows = [r for r in summary["card_table"] if r["threshold"] is not None]
    first = rows[0]
    text = (f"{first['fraction']:.0%} of all {n:,} units have |t| > {first['threshold']:g} for "
            f"'{spec['contrast']['a']}' vs '{spec['contrast']['b']}', against a null {qname} of "
            f"{_fmt_count(first['null_q'])} units ({_ratio(first)}).")
    for row in rows[1:]:
        text += (f" {row['observed']:,} units have |t| > {row['threshold']:g} against a null {qname} of "
                 f"{_fmt_count(row['null_q'])} ({_ratio(row)}).")
    total = summary["groups"]["all"][0]
    text += (f" After correction, {_pct(total['fwer'], n)} units differ at family-wise p ≤ {alpha:g} (max-|t| "
             f"sign-flip null) and {_pct(total['fdr'], n)} at Benjamini-Hochberg q ≤ {alpha:g}.")
    lines.append(text)
    best, cluster = summary["strongest_block"], summary["top_cluster"]
    if best:
        sentence = (f"The strongest block is {_block_name(best)} (`{best['site']}`): "
                    f"{_pct(best['fwer'], best['units'])} of its {best['units']:,} units pass the family-wise "
                    f"correction, max |t| {best['max_abs_t']:.2f}.")
        if cluster["label"] and summary["n_units"] > cluster["of"]:
            where = "It holds" if cluster["label"] == best["label"] else f"Block {cluster['label']} holds"
            sentence += (f" {where} {cluster['count']} of the {cluster['of']} units with the largest |t| "
                         f"({cluster['expected']:.1f} expected from its share of units).")
        lines += ["", sentence]
    return lines


def _methods(manifest: dict, summary: dict) -> list[str]:
    spec, lay, null, axis = manifest["spec"], summary["layout"], summary["null"], summary["axis"]
    ref, probe, model = spec["reference"], spec["probe"], manifest["model"]
    h, w = manifest["resolution"]
    weights = ("**random weights** (a built-in stand-in: the numbers test the tool, not the model)"
               if manifest.get("random_weights") else "trained weights")
    lines = ["## Methods", "",
             f"**Model.** `{model['source']}`, {weights}; dtype {model.get('dtype', spec['model']['dtype'])}, "
             f"device {manifest['device'].get('gpu', manifest['device']['device'])}, text sequence "
             f"{lay['text_tokens']} tokens.", ""]
    if ref.get("prompt") is not None:
        lines.append(f"**Reference image.** Generated once from the prompt \"{ref['prompt']}\" with {ref['steps']} "
                     f"steps, guidance scale {ref['guidance_scale']:g}, seed {ref['seed']}, at {h}x{w}"
                     + (f" ({manifest['resolution_note']})" if manifest.get("resolution_note") else "") + ".")
    else:
        lines.append(f"**Reference image.** The file `{ref['image']}`, at {h}x{w}.")
    conds = "; ".join(f"**{k}**: \"{v}\"" for k, v in spec["conditions"].items())
    a, b = spec["contrast"]["a"], spec["contrast"]["b"]
    fillers = "; ".join(f"{r:g} {v}" for r, v in zip(axis["ranks"], axis["fillers"]))
    lines += ["", f"**Probe passes.** {2 * summary['n_pairs']} passes, one per condition and {axis['name']} "
              f"({conds}), each conditioned on the reference image, {_n(probe['steps'], 'step')} at guidance scale "
              f"{probe['guidance_scale']:g}, every pass starting from the same noise (seed {probe['seed']}). "
              f"Contrast: d = {a} − {b} per {axis['name']} (N = {summary['n_pairs']} pairs).", "",
              f"**Axis.** {summary['n_pairs']} {axis['name']} fillers with their ranks: {fillers}.", ""]
    sites = lay["sites"]
    parts = []
    for stream, name in (("double", "double-stream"), ("single", "single-stream")):
        group = [s for s in sites if s["stream"] == stream]
        if group:
            attn = sum(s["attention_units"] for s in group)
            total = sum(s["n_units"] for s in group)
            parts.append(f"{_n(len(group), name + ' site')} x {group[0]['n_units']} units ({attn:,} attention, "
                         f"{total - attn:,} MLP), {group[0]['counted_tokens']:,} counted tokens per pass")
    patterns = ", ".join(f"`{p}`" for p in spec["capture"]["sites"])
    lines += [f"**Capture.** A forward pre-hook on every projection matching {patterns}: "
              + "; ".join(parts) + f"; {summary['n_units']:,} units of {lay['unit_width']} input channels. Each unit's "
              f"value per pass is the RMS of its channels over the counted tokens ('{lay['tokens']}'; the probe holds "
              f"{lay['text_tokens']:,} text, {lay['target_tokens']:,} target and {lay['reference_tokens']:,} reference "
              "tokens) and steps. Double-stream `to_out.0` sees the image stream only; single-stream `to_out` sees "
              "all tokens and its input is [attention heads | MLP hidden].", ""]
    flips = (f"exact (all {null['flips']:,} sign flips of the {summary['n_pairs']} pairs, 2^(N-1) up to the sign "
             "of t)" if null["exact"] else f"random ({null['flips']:,} seeded sign flips, seed {null['seed']}, "
             "the observed labelling included)")
    perms = (f"exact (all {axis['n_permutations']:,} permutations)" if axis["exact"] else
             f"{axis['n_permutations']:,} permutations (the identity and {axis['n_permutations'] - 1:,} random, "
             f"numpy seed {axis['seed']})")
    alpha = summary["alpha"]
    floor_t = _bh_floor(summary["n_units"], null["flips"], alpha)
    floor_axis = _bh_floor(summary["n_units"], axis["n_permutations"], alpha)
    lines += [f"**Statistics.** Per unit, the paired t = mean(d) / (sd(d)/√N) and Cohen's d_z = mean(d)/sd(d) with a "
              f"{summary['ci_level']:.0%} interval from the normal approximation SE = √(1/N + d_z²/(2N)) (Hedges & "
              "Olkin 1985; Goulet-Pelletier & Cousineau 2018), which is narrower than the exact noncentral-t "
              f"interval for small N or large d_z. Null: sign flips of the pairs' differences, {flips}. p "
              "(uncorrected) is the share of flips with |t| at least the observed; p (FWER) the share whose "
              "maximum |t| over all units reaches it (Westfall & Young 1993; Nichols & Holmes 2002); q is the "
              f"Benjamini-Hochberg (1995) step-up adjustment of the uncorrected p. Significant: p ≤ {alpha:g}. "
              "Threshold counts |t| > " + ", ".join(f"{c:g}" for c in null["thresholds"]) +
              f", compared with the null's mean and {null['quantile']:g} quantile.", "",
              f"**Axis.** Per unit, Spearman's ρ between d and the {axis['name']}'s rank (ties averaged), tested by "
              f"permuting the ranks across pairs (Pitman 1937), {perms}; two-sided p, max-|ρ| family-wise p "
              "and BH q, as above. ρ > 0: the difference grows towards the end of the axis "
              f"({axis['fillers'][-1]}).", "",
              f"**Resolution.** No p is below 1/{null['flips']:,} (flips) or 1/{axis['n_permutations']:,} "
              f"(permutations), so BH q ≤ {alpha:g} needs at least {floor_t:,} units at the smallest p for the "
              f"pair test and {floor_axis:,} for the axis; the max-statistic FWER has no such floor.", ""]
    return lines


def _group_table(rows: list[dict], summary: dict, first: str, name) -> list[str]:
    th = summary["null"]["thresholds"]
    head = (f"| {first} | units | " + " | ".join(f"\\|t\\|>{c:g}" for c in th)
            + " | FWER ≤ .05 | q ≤ .05 | axis FWER ≤ .05 | max \\|t\\| |")
    lines = [head, "|---|---|" + "---|" * len(th) + "---|---|---|---|"]
    for r in rows:
        n = r["units"]
        cells = [name(r), f"{n:,}"] + [_pct(r[f"over_{c:g}"], n) for c in th]
        cells += [_pct(r["fwer"], n), _pct(r["fdr"], n), _pct(r["axis_fwer"], n), f"{r['max_abs_t']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _unit_table(units: list[dict], axis_first: bool = False) -> list[str]:
    cols = ("| unit | block | kind | head | channels | t | d_z [95% CI] | p | p (FWER) | q | ρ axis | p axis (FWER) |")
    lines = [cols, "|---" * 12 + "|"]
    for u in units:
        head = "—" if u["head"] < 0 else str(u["head"])
        lines.append(f"| {u['unit']} | {u['label']} | {u['kind']} | {head} | {u['channels']} | {u['t']:.2f} | "
                     f"{u['d_z']:.2f} [{u['d_z_low']:.2f}, {u['d_z_high']:.2f}] | {u['p_uncorrected']:.3g} | "
                     f"{u['p_fwer']:.3g} | {u['q']:.3g} | {u['axis_rho']:+.2f} | {u['axis_p_fwer']:.3g} |")
    return lines


def _results(summary: dict) -> list[str]:
    g, axis, n, alpha = summary["groups"], summary["axis"], summary["n_units"], summary["alpha"]
    total = g["all"][0]
    lines = ["## Per block", ""] + _group_table(g["sites"], summary, "block", lambda r: f"{r['label']} `{r['site']}`")
    lines += ["", "Blocks: D = double-stream (joint MMDiT), S = single-stream. Counts are units (share of the block).",
              "", "## Per stream and kind", "",
              "A single-stream projection's input holds attention-head channels and MLP channels; they are "
              "counted apart.", ""]
    rows = g["streams"] + g["kinds"] + g["stream_kinds"] + g["all"]
    lines += _group_table(rows, summary, "group", lambda r: r["group"])
    both = total["axis_fwer"]
    lines += ["", f"## Along the axis ({axis['name']})", "",
              f"{_pct(both, n)} units follow the {axis['name']} axis at family-wise p ≤ {alpha:g} (max-|ρ| "
              f"permutation null; its {1 - alpha:.0%} quantile of max |ρ| is {axis['max_null_q']:.2f}), and "
              f"{_pct(total['axis_fdr'], n)} at BH q ≤ {alpha:g}. The {len(axis['top_units'])} units with the "
              "strongest axis response:", ""]
    lines += _unit_table(axis["top_units"])
    lines += ["", f"## Top {len(summary['top_units'])} units by |t|", ""] + _unit_table(summary["top_units"])
    return lines


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
    lines += _card(manifest, summary) + [""] + _methods(manifest, summary) + _results(summary)
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
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, workers=None) -> Path:
    """Render ``report.md`` and its figures in ``run_dir`` from the files already there; return its path.

    ``workers`` is a pool from ``figures.start_workers`` (forked early by ``exec``); without one the
    figures get a pool of their own.
    """
    run_dir = Path(run_dir)
    for name in ("manifest.json", "summary.json", "rms.safetensors", "null.safetensors"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir}: no {name}; is this a completed run directory of this otherview "
                                    "version? (re-run `otherview exec` to write one)")
    manifest, summary = store.read_json(run_dir / "manifest.json"), store.read_json(run_dir / "summary.json")
    if "groups" not in summary:
        raise FileNotFoundError(f"{run_dir}: summary.json predates per-unit inference; re-run `otherview exec`")
    figures = figures_mod.write_figures(run_dir, manifest, summary, workers)
    store.atomic_write_text(run_dir / "report.md", render(manifest, summary, figures))
    return run_dir / "report.md"
