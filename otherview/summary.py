"""``summary.json``: the run's results as data, from the plan and the analyses (the report renders it).

One record per analysis (a contrast at a step level: the card's table, per-site and per-kind counts,
the strongest block, the top units, the axis test, the null), one per specificity test (how many
units respond to the effect beyond the control, where, and the strongest of them), and the
replication breakdown (per level of each factor, and the consistency across levels).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from . import inference, stats
from .analysis import ContrastResult, Results, SpecificityResult, consistency, fwer_p
from .plan import Plan

TOP_UNITS = 20
TOP_AXIS = 10
SCHEMA_VERSION = 3  # 3: layout id, stream_kind, half-open channels, head None for MLP units


def unit_record(plan: Plan, i: int, res: ContrastResult) -> dict:
    """Return one unit's row for the report's tables: where it sits and its statistics in ``res``."""
    u, inf, d, t = plan.units[i], res.inf, res.d, res.t
    site = next(s for s in plan.sites if s.name == u.site)
    # channels are half-open [start, end), as everywhere in a run; head is None (not -1) for MLP units
    return {"unit": u.index, "site": u.site, "label": inference.site_label(site.stream, site.block, site.kind),
            "stream_kind": site.kind, "kind": u.kind, "head": u.head if u.kind == "attention" else None,
            "subgroup": u.subgroup, "channel_start": u.channel_start, "channel_end": u.channel_end,
            "channels": f"[{u.channel_start}, {u.channel_end})",
            "t": float(t[i]), "mean_d": float(d[:, i].mean()), "d_z": float(inf.d_z[i]),
            "d_z_low": float(inf.d_z_low[i]), "d_z_high": float(inf.d_z_high[i]),
            "g_z": _num(inf.g_z, i), "g_z_low": _num(inf.g_z_low, i), "g_z_high": _num(inf.g_z_high, i),
            "p_uncorrected": float(inf.p_uncorrected[i]), "p_fwer": float(inf.p_fwer[i]),
            "p_step_down": _num(inf.p_step_down, i), "q": float(inf.q[i]),
            "axis_rho": float(inf.axis.rho[i]), "axis_p": float(inf.axis.p_uncorrected[i]),
            "axis_p_fwer": float(inf.axis.p_fwer[i]), "axis_q": float(inf.axis_q[i])}


def _num(values, i: int):
    """Return ``values[i]`` as a JSON number, None where absent or not finite (strict JSON)."""
    if values is None:
        return None
    v = float(values[i])
    return v if np.isfinite(v) else None


#: The transformer config keys that fix which units exist and what their channels hold.
_LAYOUT_CONFIG = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "mlp_ratio",
                  "joint_attention_dim", "in_channels")


def layout_id(plan: Plan) -> str:
    """Return the id of the run's unit layout: two runs whose ids are equal have the same units in the same order.

    A SHA-256 (first 16 hex digits) over the architecture's shape (the transformer config's widths
    and block counts, and the pipeline class, which orders the image stream), the capture settings
    (sites with their widths and token segments, unit width, counted tokens) and the token counts.
    Weights, prompts and seeds do not enter: a random-weight run and a trained one of the same
    architecture and capture settings share an id, so their units can be matched by index.
    """
    arch = plan.arch
    key = {"architecture": {k: arch.transformer.get(k) for k in _LAYOUT_CONFIG} | {"pipeline": arch.pipeline_class},
           "unit_width": plan.unit_width, "tokens": plan.spec.capture.tokens,
           "token_counts": [plan.text_tokens, plan.target_tokens, plan.reference_tokens],
           "sites": [[s.name, s.width, s.attention_width, s.n_units, list(s.segment)] for s in plan.sites]}
    canon = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def layout(plan: Plan) -> dict[str, Any]:
    """Return the unit layout: its id, unit width, token counts and every site's units.

    ``stream_kind`` is the stream a site's input holds (image, text or joint); a unit's ``kind`` is
    attention or mlp.
    """
    g = plan.unit_width
    return {"id": layout_id(plan), "architecture": plan.arch.name or plan.arch.source, "unit_width": g,
            "tokens": plan.spec.capture.tokens, "text_tokens": plan.text_tokens,
            "target_tokens": plan.target_tokens, "reference_tokens": plan.reference_tokens,
            "sites": [{"name": s.name, "label": inference.site_label(s.stream, s.block, s.kind), "stream": s.stream,
                       "block": s.block, "stream_kind": s.kind, "unit_offset": s.unit_offset, "n_units": s.n_units,
                       "attention_units": s.attention_width // g, "counted_tokens": s.segment[1] - s.segment[0],
                       "tokens": s.tokens} for s in plan.sites]}


def _site_rows(rows: list[dict]) -> list[dict]:
    """Return the per-site group rows with the site's stream kind under ``stream_kind`` (``kind`` is a unit's)."""
    for r in rows:
        if "kind" in r:
            r["stream_kind"] = r.pop("kind")
    return rows


def analysis_summary(plan: Plan, res: ContrastResult) -> dict[str, Any]:
    """Return one analysis's record: card table, groups, strongest block, top units, axis, null."""
    spec, d, t, inf, null = plan.spec, res.d, res.t, res.inf, res.null
    groups = inference.group_summaries(plan, t, inf, alpha=spec.null.alpha)
    groups["sites"] = _site_rows(groups["sites"])
    strongest = inference.strongest_site(groups["sites"], spec.null.thresholds)
    by_t = np.argsort(-np.abs(t), kind="stable")[:TOP_UNITS]
    by_axis = np.lexsort((-np.abs(inf.axis.rho), inf.axis.p_uncorrected, inf.axis.p_fwer))[:TOP_AXIS]
    top = [unit_record(plan, int(i), res) for i in by_t]
    labels = [r["label"] for r in top]
    cluster = max(dict.fromkeys(labels), key=labels.count) if labels else None
    share = {r["label"]: r["units"] / max(d.shape[1], 1) for r in groups["sites"]}
    axis = inf.axis
    a = res.analysis
    return {"key": a.key, "contrast": a.contrast, "label": res.label, "step": a.step,
            "derived_from": list(plan.design.contrast(a.contrast).derived_from or []) or None,
            "card_table": stats.card_table(t, null, spec.null.alpha), "groups": groups,
            "strongest_block": strongest,
            "top_cluster": {"label": cluster, "count": labels.count(cluster) if cluster else 0, "of": len(top),
                            "expected": len(top) * share.get(cluster, 0.0)},
            "top_units": top,
            "axis": {"name": spec.axis.name, "fillers": [f.value for f in spec.axis.fillers], "ranks": spec.ranks(),
                     "n_permutations": axis.n_permutations, "exact": axis.exact, "seed": axis.seed,
                     "max_null_q": float(np.quantile(axis.max_null, 1 - spec.null.alpha)),
                     "top_units": [unit_record(plan, int(i), res) for i in by_axis]},
            "null": {"method": null.method, "exact": null.exact, "flips": int(null.result.n_flips),
                     "seed": spec.null.seed, "quantile": null.quantile, "thresholds": null.thresholds,
                     "fwer": null.fwer, "min_p": null.min_p, "notes": list(null.notes),
                     "step_down_passes": int(getattr(null.result, "step_down_passes", 0) or 0),
                     "max_p_fwer_error": float(np.max(inf.p_fwer_error)) if inf.p_fwer_error is not None else 0.0,
                     "exact_units": int(np.sum(null.result.exact_units)) if null.result.exact_units is not None
                     else None, "axis_min_p": float(getattr(axis, "min_p", 1.0 / axis.n_permutations))}}


def _specificity_summary(plan: Plan, s: SpecificityResult, results: Results) -> dict[str, Any]:
    e, diff, ctl = results.get(s.effect_key), results.get(s.difference_key), results.get(s.control_key)
    alpha = plan.spec.null.alpha
    passed = s.passed
    rows = []
    for site in plan.sites:
        idx = np.arange(site.unit_offset, site.unit_offset + site.n_units)
        kinds = np.array([plan.units[i].kind for i in idx])
        rows.append({"site": site.name, "label": inference.site_label(site.stream, site.block, site.kind),
                     "units": int(site.n_units), "passed": int(passed[idx].sum()),
                     "passed_attention": int((passed[idx] & (kinds == "attention")).sum()),
                     "effect_fwer": int((fwer_p(e.inf)[idx] <= alpha).sum())})
    order = np.flatnonzero(passed)
    order = order[np.argsort(-np.minimum(np.abs(e.t[order]), np.abs(diff.t[order])), kind="stable")][:TOP_UNITS]
    top = []
    for i in order:
        rec = unit_record(plan, int(i), e)
        rec.update(t_control=float(ctl.t[i]), t_difference=float(diff.t[i]),
                   p_fwer_difference=float(fwer_p(diff.inf)[i]))
        top.append(rec)
    effect_sig = fwer_p(e.inf) <= alpha
    return {"name": s.test.name, "key": s.key, "step": s.step, "effect": s.effect_key, "control": s.control_key,
            "difference": s.difference_key, "effect_label": e.label, "control_label": ctl.label,
            "difference_label": diff.label, "passed": int(passed.sum()),
            "positive": int((passed & (s.sign > 0)).sum()), "negative": int((passed & (s.sign < 0)).sum()),
            "effect_significant": int(effect_sig.sum()),
            "control_significant": int((fwer_p(ctl.inf) <= alpha).sum()),
            "effect_not_specific": int((effect_sig & ~passed).sum()), "sites": rows, "top_units": top}


def summarise(plan: Plan, results: Results) -> dict[str, Any]:
    """Return the run's summary (see the module docstring); JSON-ready."""
    spec, design = plan.spec, plan.design
    n_items = len(design.items)
    replication = []
    for res in results.contrasts:
        factors = [consistency(results.levels, res, f, spec.null.alpha) for f in design.levels()]
        factors = [f for f in factors if f]
        if factors:
            replication.append({"analysis": res.key, "label": res.label, "factors": factors})
    return {"schema_version": SCHEMA_VERSION, "experiment": spec.experiment.name, "n_pairs": n_items,
            "n_items": n_items, "n_units": plan.n_units, "alpha": spec.null.alpha, "ci_level": inference.CI_LEVEL,
            "layout": layout(plan),
            "design": {"conditions": design.conditions,
                       "templates": {c: spec.templates(c) for c in design.conditions},
                       "contrasts": [{"name": c.name, "label": c.label, "weights": dict(zip(design.conditions, c.weights)),
                                      "derived_from": list(c.derived_from) if c.derived_from else None}
                                     for c in design.contrasts],
                       "scenes": [{"name": s.name, "prompt": s.prompt, "image": s.image, "seed": s.seed}
                                  for s in design.scenes],
                       "seeds": design.seeds, "wordings": design.n_wordings,
                       "steps": [s for s in design.steps], "passes": len(design.passes)},
            "analyses": [analysis_summary(plan, r) for r in results.contrasts],
            "specificity": [_specificity_summary(plan, s, results) for s in results.specificity],
            "replication": replication, "warnings": list(plan.warnings)}
