"""What a finished run writes beside its manifest: ``passes.csv``, ``units.csv``, the arrays
(``rms``, ``null``, ``inference`` safetensors), ``summary.json``, the nulls' record, and the seal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import analysis as analysis_mod
from . import store
from . import summary as summary_mod
from .phases import Phases
from .plan import Plan


def _opt(values, i: int):
    return "" if values is None else float(values[i])


def _unit_rows(plan: Plan, results: analysis_mod.Results) -> list[dict]:
    """Return units.csv's rows: one per analysis and unit, where the unit sits and its statistics."""
    rows = []
    stream_kind = {s.name: s.kind for s in plan.sites}  # image / text / joint; a unit's kind is attention / mlp
    for res in results.contrasts:
        inf, d, t = res.inf, res.d, res.t
        mean_d = d.mean(axis=0)
        for u in plan.units:
            i = u.index
            rows.append({"analysis": res.key, "contrast": res.analysis.contrast,
                         "step": "mean" if res.analysis.step is None else res.analysis.step,
                         "unit": i, "site": u.site, "stream": u.stream, "stream_kind": stream_kind[u.site], "block": u.block,
                         "channel_start": u.channel_start, "channel_end": u.channel_end, "kind": u.kind,
                         "head": u.head if u.kind == "attention" else "", "subgroup": u.subgroup,
                         "mean_d": float(mean_d[i]), "t": float(t[i]), "d_z": float(inf.d_z[i]),
                         "d_z_low": float(inf.d_z_low[i]), "d_z_high": float(inf.d_z_high[i]),
                         "g_z": _opt(inf.g_z, i), "g_z_low": _opt(inf.g_z_low, i), "g_z_high": _opt(inf.g_z_high, i),
                         "p_uncorrected": float(inf.p_uncorrected[i]), "p_fwer": float(inf.p_fwer[i]),
                         "p_step_down": _opt(inf.p_step_down, i),
                         "q": float(inf.q[i]), "axis_rho": float(inf.axis.rho[i]),
                         "axis_p": float(inf.axis.p_uncorrected[i]), "axis_p_fwer": float(inf.axis.p_fwer[i]),
                         "axis_q": float(inf.axis_q[i])})
    return rows


def pass_rows(plan: Plan) -> list[dict]:
    """Return passes.csv's rows: one per row of the per-pass arrays (a pass at a captured step level)."""
    design, counts = plan.design, plan.token_counts or {}
    rows = []
    for p in plan.passes:
        for k, step in enumerate(design.steps):
            rows.append({"row": design.row(p.index, k), "pass": p.index, "condition": p.condition, "item": p.item,
                         "item_value": design.items[p.item].value, "wording": p.wording,
                         "scene": design.scenes[p.scene].name, "seed": p.seed, "step": "mean" if step is None else step,
                         "prompt": p.prompt, "tokens": counts.get(p.prompt, "")})
    return rows


def write_results(plan: Plan, rms: np.ndarray, results, run_dir: Path, phases: Phases, manifest: dict) -> None:
    """The write phase: every array and table of ``results``, the summary and the nulls' record; then seal."""
    with phases("write"):
        arrays = {"rms": rms}
        nulls, infs, meta = {}, {}, {}
        for res in results.contrasts:
            k = res.key
            arrays[f"{k}/d"], arrays[f"{k}/t"] = res.d, res.t
            r = res.null.result
            nulls.update({f"{k}/count_hist": r.count_hist, f"{k}/exceed": r.exceed, f"{k}/fwer_exceed": r.fwer_exceed,
                          f"{k}/max_hist": r.max_hist})
            for name in ("fwer_exceed_lo", "step_down_exceed", "observed_count"):
                if getattr(r, name, None) is not None:
                    nulls[f"{k}/{name}"] = getattr(r, name)
            meta[k] = {"mode": r.mode, "n_flips": int(r.n_flips)}
            infs.update({f"{k}/{name}": v for name, v in res.inf.arrays().items()})
        for s in results.specificity:
            arrays[f"{s.key}/passed"] = s.passed.astype(np.uint8)
        store.write_tensors(run_dir / "rms.safetensors", arrays,
                            {"passes_done": str(len(plan.passes)), "random_weights": str(plan.arch.random_weights)})
        store.write_tensors(run_dir / "null.safetensors", nulls, {"analyses": json.dumps(meta, sort_keys=True)})
        store.write_tensors(run_dir / "inference.safetensors", infs)
        store.write_csv(run_dir / "units.csv", _unit_rows(plan, results))
        summary = summary_mod.summarise(plan, results)
        summary["random_weights"] = plan.arch.random_weights
        store.write_json(run_dir / "summary.json", summary)
        manifest.update(null={r.key: _null_record(r.null) for r in results.contrasts})
        store.seal(run_dir, manifest)  # from here on, report refuses files that no longer match


def _null_record(null) -> dict:
    """Return the manifest's record of one contrast's null; a split null says how (processes, ranges)."""
    record = {"method": null.method, "exact": null.exact, "flips": int(null.result.n_flips)}
    ranges = null.result.flip_ranges
    if len(ranges) > 1:  # each step-down pass is split into the same ranges
        record["split"] = {"processes": len(ranges), "flip_ranges": [list(r) for r in ranges]}
    return record
