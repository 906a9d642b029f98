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

from . import causal_report
from . import figures as figures_mod
from . import store
from .summary import summarise  # noqa: F401  (the report's data; kept importable from here)

REFERENCES = [
    "Benjamini, Y. & Hochberg, Y. (1995). Controlling the false discovery rate. J. R. Stat. Soc. B 57, 289-300.",
    "Hedges, L. V. & Olkin, I. (1985). Statistical Methods for Meta-Analysis, ch. 5. Academic Press.",
    "Hemerik, J., Solari, A. & Goeman, J. J. (2019). Permutation-based simultaneous confidence bounds for the "
    "false discovery proportion. Biometrika 106, 635-649.",
    "Goulet-Pelletier, J.-C. & Cousineau, D. (2018). A review of effect sizes and their confidence intervals, "
    "part I: the Cohen's d family. Quant. Methods Psychol. 14, 242-265.",
    "Nichols, T. E. & Holmes, A. P. (2002). Nonparametric permutation tests for functional neuroimaging. "
    "Hum. Brain Mapp. 15, 1-25.",
    "Westfall, P. H. & Young, S. S. (1993). Resampling-Based Multiple Testing. Wiley.",
    "Nichols, T., Brett, M., Andersson, J., Wager, T. & Poline, J.-B. (2005). Valid conjunction inference with "
    "the minimum statistic. NeuroImage 25, 653-660.",
    "Clark, H. H. (1973). The language-as-fixed-effect fallacy. J. Verbal Learn. Verbal Behav. 12, 335-359.",
    "Pitman, E. J. G. (1937). Significance tests which may be applied to samples from any populations. II. "
    "The correlation coefficient test. J. R. Stat. Soc. Suppl. 4, 225-232.",
]


def _fmt_count(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def _ratio(row: dict) -> str:
    if row["ratio"] is None:
        if row["threshold"] is None:
            return "—"
        return f"> {row.get('ratio_above', row['observed']):,}× (null quantile 0)"
    return f"{row['ratio']:,.0f}×" if row["ratio"] >= 10 else f"{row['ratio']:.2g}×"


def _p(p: float | None) -> str:
    return "—" if p is None else f"{p:.3g}"


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
    return f"double-stream (joint MMDiT) block {row['block']}" + (" text stream" if row["stream_kind"] == "text" else "")


def _card(summary: dict, a: dict, heading: str) -> list[str]:
    """Return one analysis's card table and the sentence it draws."""
    null = a["null"]
    qname = f"p{null['quantile'] * 100:g}"
    kind = (f"exact: all {null['flips']:,} sign flips" if null["exact"]
            else f"{null['flips']:,} seeded random sign flips (seed {null['seed']})")
    level = f"{1 - summary['alpha']:.0%}"
    lines = [heading, "", f"| metric | observed | null mean | null {qname} | observed / null {qname} | p | "
             f"truly responding ({level} lower bound) |", "|---|---|---|---|---|---|---|"]
    for row in a["card_table"]:
        if row["threshold"] is None:
            lines.append(f"| max \\|t\\| | {row['observed']:.2f} | {row['null_mean']:.2f} | {row['null_q']:.2f} | — | "
                         f"{_p(row.get('p'))} | — |")
        else:
            bound = row.get("bound")
            lines.append(f"| {row['metric'].replace('|', chr(92) + '|')} | {row['observed']:,} ({row['fraction']:.0%}) | "
                         f"{_fmt_count(row['null_mean'])} | {_fmt_count(row['null_q'])} | {_ratio(row)} | "
                         f"{_p(row.get('p'))} | {'—' if bound is None else f'≥ {max(bound, 0):,}'} |")
    n, alpha = summary["n_units"], summary["alpha"]
    lines += ["", f"Null: {kind}, {summary['n_items']} items, {n:,} units; smallest attainable p "
              f"{null.get('min_p', 1 / null['flips']):.3g}. p: the share of sign flips whose count (or max |t|) "
              f"reaches the observed; the bound: with probability ≥ {level}, at least this many of the units over "
              "the threshold truly respond (Hemerik, Solari & Goeman 2019; per threshold). The ratio is a "
              "description, not a test."]
    lines += [f"> Null note: {note}" for note in null.get("notes", [])] + [""]
    rows = [r for r in a["card_table"] if r["threshold"] is not None]
    first = rows[0]
    text = (f"{first['fraction']:.0%} of all {n:,} units have |t| > {first['threshold']:g} for {a['label']}, "
            f"against a null {qname} of {_fmt_count(first['null_q'])} units ({_ratio(first)}).")
    for row in rows[1:]:
        text += (f" {row['observed']:,} units have |t| > {row['threshold']:g} against a null {qname} of "
                 f"{_fmt_count(row['null_q'])} ({_ratio(row)}).")
    total = a["groups"]["all"][0]
    step = (f", {_pct(total['fwer_step_down'], n)} by the step-down procedure" if "fwer_step_down" in total else "")
    text += (f" After correction, {_pct(total['fwer'], n)} units differ at family-wise p ≤ {alpha:g} (single-step "
             f"max-|t| sign-flip null){step}, and {_pct(total['fdr'], n)} at Benjamini-Hochberg q ≤ {alpha:g}.")
    lines.append(text)
    best, cluster = a["strongest_block"], a["top_cluster"]
    if best:
        sentence = (f"The strongest block (largest share of units passing the family-wise correction, then the "
                    f"larger share over the top threshold, then max |t|) is {_block_name(best)} (`{best['site']}`): "
                    f"{_pct(best['fwer'], best['units'])} of its {best['units']:,} units pass, max |t| "
                    f"{best['max_abs_t']:.2f}.")
        if cluster["label"] and n > cluster["of"]:
            where = "It holds" if cluster["label"] == best["label"] else f"Block {cluster['label']} holds"
            sentence += (f" {where} {cluster['count']} of the {cluster['of']} units with the largest |t| "
                         f"({cluster['expected']:.1f} expected from its share of units).")
        lines += ["", sentence]
    return lines


def _design_methods(spec: dict, summary: dict) -> list[str]:
    design, axis = summary["design"], summary["analyses"][0]["axis"]
    probe = spec["probe"]
    conds = "; ".join(f"**{k}**: " + " / ".join(f"\"{t}\"" for t in v) for k, v in design["templates"].items())
    contrasts = "; ".join(f"**{c['name']}**: d = {c['label']}" + (" (the specificity difference)" if c["derived_from"]
                                                                    else "") for c in design["contrasts"])
    n_passes = design["passes"]
    w, sc, se = design["wordings"], len(design["scenes"]), len(design["seeds"])
    fillers = "; ".join(f"{r:g} {v}" for r, v in zip(axis["ranks"], axis["fillers"]))
    steps = ("each unit's value is the mean over the steps" if design["steps"] == [None]
             else "every step is captured and analysed apart")
    sigma = ("a one-step probe starts from pure noise (sigma = 1): only the reference tokens carry the scene"
             if probe["steps"] == 1 else f"sigmas from 1 down to {1 / probe['steps']:.3g}")
    return [f"**Probe passes.** {n_passes:,} passes: {len(design['conditions'])} conditions x {summary['n_items']} "
            f"items ({axis['name']} fillers) x {sc} scene(s) x {se} seed(s) ({', '.join(map(str, design['seeds']))}) x {w} wording(s), "
            f"each pass run once whichever contrasts use it. Conditions ({conds}). Each pass is conditioned on its "
            f"scene's reference image, {_n(probe['steps'], 'step')} at guidance scale {probe['guidance_scale']:g} "
            f"({sigma}); {steps}; every pass of a seed starts from the same noise.", "",
            f"**Contrasts.** {contrasts}. Per item (one {axis['name']} filler, the unit of inference, N = "
            f"{summary['n_items']}), d is the weighted sum of its condition values, averaged over scenes, seeds and "
            "wordings; sign flips act on items. This supports claims about new items for these scenes, seeds and "
            "wordings, "
            "not about new scenes or wordings (Clark 1973): the replication section shows each level apart.", "",
            f"**Axis.** {summary['n_items']} {axis['name']} fillers with their ranks: {fillers}.", ""]


def _methods(manifest: dict, summary: dict) -> list[str]:
    spec, lay, axis = manifest["spec"], summary["layout"], summary["analyses"][0]["axis"]
    nulls = {(a["null"]["method"], a["null"]["flips"]) for a in summary["analyses"]}
    ref, model = spec["reference"], manifest["model"]
    h, w = manifest["resolution"]
    weights = ("**random weights** (a built-in stand-in: the numbers test the tool, not the model)"
               if manifest.get("random_weights") else "trained weights")
    lines = ["## Methods", "",
             f"**Model.** `{model['source']}`, {weights}; dtype {model.get('dtype', spec['model']['dtype'])}, "
             f"device {manifest['device'].get('gpu', manifest['device']['device'])}, text sequence "
             f"{lay['text_tokens']} tokens.", ""]
    scenes = summary["design"]["scenes"]
    parts = []
    for sc in scenes:
        if sc["prompt"] is not None:
            parts.append(f"{sc['name']}: generated once from the prompt \"{sc['prompt']}\" with {ref['steps']} steps, "
                         f"guidance scale {ref['guidance_scale']:g}, seed {sc['seed']}")
        else:
            parts.append(f"{sc['name']}: the file `{sc['image']}`")
    note = f" ({manifest['resolution_note']})" if manifest.get("resolution_note") else ""
    lines += [f"**Reference image{'s' if len(scenes) > 1 else ''}** (at {h}x{w}{note}). " + "; ".join(parts) + ".", ""]
    lines += _design_methods(spec, summary)
    sites = lay["sites"]
    groups = []
    for stream, name in (("double", "double-stream"), ("single", "single-stream")):
        for kind in ("image", "text", "joint"):
            group = [s for s in sites if s["stream"] == stream and s["stream_kind"] == kind]
            if group:
                attn = sum(s["attention_units"] for s in group)
                total = sum(s["n_units"] for s in group)
                groups.append(f"{_n(len(group), name + ' ' + kind + '-stream site')} x {group[0]['n_units']} units "
                              f"({attn:,} attention, {total - attn:,} MLP), {group[0]['counted_tokens']:,} counted "
                              "tokens per pass")
    patterns = ", ".join(f"`{p}`" for p in spec["capture"]["sites"])
    lines += [f"**Capture.** A forward pre-hook on every projection matching {patterns}: " + "; ".join(groups)
              + f"; {summary['n_units']:,} units of {lay['unit_width']} input channels. Each unit's value per pass is "
              f"the RMS of its channels over the counted tokens ('{lay['tokens']}'; the probe holds "
              f"{lay['text_tokens']:,} text, {lay['target_tokens']:,} target and {lay['reference_tokens']:,} reference "
              "tokens). Double-stream `to_out.0` sees the image stream only and `to_add_out` the text stream; "
              "single-stream `to_out` sees all tokens and its input is [attention heads | MLP hidden].", ""]
    null_text = "; ".join((f"exact (all {f:,} sign flips of the {summary['n_items']} items, 2^(N-1) up to the sign of t)"
                           if m == "exact" else f"random ({f:,} seeded sign flips, seed {spec['null']['seed']}, the "
                           "observed labelling included)") for m, f in sorted(nulls))
    perms = (f"exact (all {axis['n_permutations']:,} permutations)" if axis["exact"] else
             f"{axis['n_permutations']:,} permutations (the identity and {axis['n_permutations'] - 1:,} random, "
             f"numpy seed {axis['seed']})")
    alpha = summary["alpha"]
    min_flips = min(f for _, f in nulls)
    floor_t = _bh_floor(summary["n_units"], min_flips, alpha)
    floor_axis = _bh_floor(summary["n_units"], axis["n_permutations"], alpha)
    a0 = summary["analyses"][0]["null"]
    fwer = a0.get("fwer", "single-step")
    exact_units = a0.get("exact_units")
    held = (f" Differences are held as integers ({exact_units:,} of {summary['n_units']:,} units exactly, the rest "
            "rounded so that t moves by less than 1e-7), so p-values and threshold counts are exact for those "
            "integers." if exact_units is not None else "")
    floors = "; ".join(f"{a['key']}: {a['null'].get('min_p', 1 / a['null']['flips']):.3g}" for a in summary["analyses"])
    lines += [f"**Statistics.** Per unit and contrast, the paired t = mean(d) / (sd(d)/√N) and Hedges' g_z = J·d_z "
              "(d_z = mean(d)/sd(d); J = Γ(m/2)/(√(m/2)·Γ((m−1)/2)), m = N−1, which removes d_z's small-sample "
              f"bias), with a {summary['ci_level']:.0%} interval for the standardised mean difference from the "
              "noncentral t with N−1 degrees of freedom (exact). A unit whose differences are all equal has t = ±∞ "
              "(g_z ±∞) if they are nonzero and 0 if zero. "
              f"Null: sign flips of the items' contrast values, {null_text}.{held} Smallest attainable p per "
              f"analysis: {floors}. p (uncorrected) is the share of flips with |t| at least the observed; p (FWER) "
              "the share whose maximum |t| over the units reaches it (Westfall & Young 1993; Nichols & Holmes "
              f"2002), single-step" + (", and step-down (the maximum over the units not yet rejected, on the "
                                       "same flips; it rejects at least as many units)" if fwer == "step-down" else "")
              + f"; the unit tables give the {fwer} p. q is the Benjamini-Hochberg (1995) step-up adjustment of the "
              "uncorrected p; each contrast is corrected over units, not across contrasts. Significant: p ≤ "
              f"{alpha:g}. Threshold counts |t| > " + ", ".join(f"{c:g}" for c in spec["null"]["thresholds"]) +
              f" are tested against their sign-flip distribution, with a {1 - alpha:.0%} lower bound on the truly "
              "responding units among them (observed count minus the null count's 1−α quantile; Hemerik, Solari & "
              f"Goeman 2019), and compared with the null's mean and {spec['null']['quantile']:g} quantile. The "
              "test assumes each item's contrast value is symmetric about 0 under the null: skewed values inflate "
              "the error.", ""]
    if summary["specificity"]:
        lines += ["**Specificity.** A unit responds to the effect beyond the control when the effect contrast AND "
                  "the effect minus the control both pass the family-wise correction, with the same sign: the "
                  "minimum-statistic conjunction (Nichols et al. 2005), valid without assuming the two tests "
                  "independent. It claims the unit's response to the effect exceeds its response to the control; "
                  "it does not claim the unit is silent to the control.", ""]
    lines += [f"**Axis.** Per unit, Spearman's ρ between d and the {axis['name']}'s rank (ties averaged), tested by "
              f"permuting the ranks across items (Pitman 1937), {perms}; two-sided p, max-|ρ| family-wise p "
              "and BH q, as above. ρ > 0: the difference grows towards the end of the axis "
              f"({axis['fillers'][-1]}).", "",
              f"**Resolution.** No p is below 1/{min_flips:,} (flips) or 1/{axis['n_permutations']:,} "
              f"(permutations), so BH q ≤ {alpha:g} needs at least {floor_t:,} units at the smallest p for the "
              f"pair test and {floor_axis:,} for the axis; the max-statistic FWER has no such floor.", ""]
    return lines


def _group_table(rows: list[dict], summary: dict, a: dict, first: str, name) -> list[str]:
    th = a["null"]["thresholds"]
    al = f"{summary['alpha']:g}"
    sd = bool(rows) and "fwer_step_down" in rows[0]
    head = (f"| {first} | units | " + " | ".join(f"\\|t\\|>{c:g}" for c in th)
            + f" | FWER ≤ {al} (single-step) |" + (f" FWER ≤ {al} (step-down) |" if sd else "")
            + f" q ≤ {al} | axis FWER ≤ {al} | max \\|t\\| |")
    lines = [head, "|---|---|" + "---|" * len(th) + "---|" * (4 + sd)]
    for r in rows:
        n = r["units"]
        cells = [name(r), f"{n:,}"] + [_pct(r[f"over_{c:g}"], n) for c in th] + [_pct(r["fwer"], n)]
        cells += [_pct(r["fwer_step_down"], n)] if sd else []
        cells += [_pct(r["fdr"], n), _pct(r["axis_fwer"], n), f"{r['max_abs_t']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _unit_table(units: list[dict], level: float) -> list[str]:
    cols = (f"| unit | block | kind | head | channels [start, end) | t | g_z [{level:.0%} CI] | p | p (FWER) | q | ρ axis | "
            "p axis (FWER) |")
    lines = [cols, "|---" * 12 + "|"]
    for u in units:
        head = "—" if u["head"] is None or u["head"] < 0 else str(u["head"])
        g = u.get("g_z")
        eff = (f"{_f2(g)} [{_f2(u.get('g_z_low'))}, {_f2(u.get('g_z_high'))}]" if "g_z" in u else
               f"{u['d_z']:.2f} [{u['d_z_low']:.2f}, {u['d_z_high']:.2f}]")
        p_fwer = u["p_step_down"] if u.get("p_step_down") is not None else u["p_fwer"]
        lines.append(f"| {u['unit']} | {u['label']} | {u['kind']} | {head} | {u['channels']} | {u['t']:.2f} | "
                     f"{eff} | {u['p_uncorrected']:.3g} | {p_fwer:.3g} | {u['q']:.3g} | {u['axis_rho']:+.2f} | "
                     f"{u['axis_p_fwer']:.3g} |")
    return lines


def _f2(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def _results(summary: dict, a: dict, level: int) -> list[str]:
    g, axis, n, alpha = a["groups"], a["axis"], summary["n_units"], summary["alpha"]
    h = "#" * level
    total = g["all"][0]
    lines = [f"{h} Per block", ""] + _group_table(g["sites"], summary, a, "block",
                                                  lambda r: f"{r['label']} `{r['site']}`")
    lines += ["", "Blocks: D = double-stream (joint MMDiT; Dn t = its text stream), S = single-stream. Counts are "
              "units (share of the block).", "", f"{h} Per stream and kind", "",
              "A single-stream projection's input holds attention-head channels and MLP channels; they are "
              "counted apart.", ""]
    rows = g["streams"] + g["kinds"] + g["stream_kinds"] + g["all"]
    lines += _group_table(rows, summary, a, "group", lambda r: r["group"])
    lines += ["", f"{h} Along the axis ({axis['name']})", "",
              f"{_pct(total['axis_fwer'], n)} units follow the {axis['name']} axis at family-wise p ≤ {alpha:g} (max-|ρ| "
              f"permutation null; its {1 - alpha:.0%} quantile of max |ρ| is {axis['max_null_q']:.2f}), and "
              f"{_pct(total['axis_fdr'], n)} at BH q ≤ {alpha:g}. The {len(axis['top_units'])} units with the "
              "strongest axis response:", ""]
    lines += _unit_table(axis["top_units"], summary["ci_level"])
    lines += ["", f"{h} Top {len(a['top_units'])} units by |t|", ""] + _unit_table(a["top_units"], summary["ci_level"])
    return lines


def _specificity(summary: dict, s: dict) -> list[str]:
    n, alpha = summary["n_units"], summary["alpha"]
    lines = [f"## Specificity: {s['name']}", "",
             f"**{_pct(s['passed'], n)} units respond to {s['effect_label']} beyond what {s['control_label']} "
             f"produces**: each passes the family-wise correction (p ≤ {alpha:g}) for the effect `{s['effect']}` and "
             f"for the difference `{s['difference']}` = {s['difference_label']}, with the same sign "
             f"({s['positive']:,} positive, {s['negative']:,} negative). For comparison, {s['effect_significant']:,} "
             f"units pass for the effect alone and {s['control_significant']:,} for the control alone; "
             f"{s['effect_not_specific']:,} units respond to the effect but not beyond the control.", "",
             "This claims these units respond more to the effect than to the control; it does not claim they are "
             "silent to the control, and on random weights any such count is what the tool produces without "
             "training.", "", "| block | units | pass the conjunction | of them attention | effect FWER |",
             "|---|---|---|---|---|"]
    for r in s["sites"]:
        lines.append(f"| {r['label']} `{r['site']}` | {r['units']:,} | {_pct(r['passed'], r['units'])} | "
                     f"{r['passed_attention']:,} | {_pct(r['effect_fwer'], r['units'])} |")
    if s["top_units"]:
        lines += ["", f"Strongest units (by the smaller of |t| effect and |t| difference), up to {len(s['top_units'])}:",
                  "", "| unit | block | kind | head | t effect | t control | t difference | p (FWER) difference |",
                  "|---|---|---|---|---|---|---|---|"]
        for u in s["top_units"]:
            head = "—" if u["head"] is None else str(u["head"])
            lines.append(f"| {u['unit']} | {u['label']} | {u['kind']} | {head} | {u['t']:.2f} | {u['t_control']:.2f} | "
                         f"{u['t_difference']:.2f} | {u['p_fwer_difference']:.3g} |")
    return lines


def _replication(summary: dict) -> list[str]:
    if not summary["replication"]:
        return []
    alpha = summary["alpha"]
    lines = ["## Replication across scenes, seeds and wordings", "",
             "Each level analysed alone (its items' contrast values at that level only), with its own sign-flip "
             "null. Sign agreement: among units significant overall, the share whose t has the same sign in every "
             f"level. Significant in every level: family-wise p ≤ {alpha:g} within each level, same sign as "
             "overall. These are descriptive: scenes and wordings are few, so they are not random factors of the "
             "test.", "", "| contrast | factor | level | significant (FWER) | max \\|t\\| | null |", "|---|---|---|---|---|---|"]
    for rep in summary["replication"]:
        for f in rep["factors"]:
            for k, label in enumerate(f["levels"]):
                null = (f"exact {f['per_level_flips'][k]:,}" if f["per_level_method"][k] == "exact"
                        else f"{f['per_level_flips'][k]:,} random flips")
                lines.append(f"| {rep['analysis']} | {f['factor']} | {label} | {f['per_level_significant'][k]:,} | "
                             f"{f['per_level_max_abs_t'][k]:.2f} | {null} |")
    lines += ["", "| contrast | factor | significant overall | sign agreement | significant in every level |",
              "|---|---|---|---|---|"]
    for rep in summary["replication"]:
        for f in rep["factors"]:
            agree = "—" if f["sign_agreement"] is None else f"{f['sign_agreement']:.0%}"
            lines.append(f"| {rep['analysis']} | {f['factor']} | {f['significant_overall']:,} | {agree} | "
                         f"{f['significant_in_every_level']:,} |")
    return lines + [""]


def _memory_line(manifest: dict[str, Any]) -> list[str]:
    """Return the provenance line on memory: the placement, the budget, the estimated and measured peaks."""
    mem = manifest.get("memory")
    if not mem:
        return []
    budget = "not limited" if mem.get("budget_gib") is None else f"{mem['budget_gib']:.1f} GiB ({mem.get('budget_source')})"
    peak = f"; measured peak {mem['peak_gib']:.2f} GiB allocated" if mem.get("peak_gib") is not None else ""
    return [f"- memory: placement {mem['placement']}, probe batch {mem.get('batch_size')}, prompts encoded "
            f"{mem.get('encode_chunk')} at a time; budget {budget}; estimated peak {mem['estimated_peak_gib']:.2f} GiB{peak}"]


def _resolved(setting: Any, value: Any) -> str:
    """Return "auto -> value" where a setting was resolved to something else, else the value."""
    return f"{setting} -> {value}" if value is not None and setting != value else str(setting)


def _runtime_line(manifest: dict[str, Any]) -> list[str]:
    """Return the provenance line on how the probes ran: every ``auto`` as it was resolved, and why."""
    rt = manifest.get("runtime")
    if not rt:
        return []
    dec = rt.get("compile_decision") or {}
    reason = dec.get("reason") or ""
    setting = dec.get("setting")
    if setting and reason and not reason.startswith(setting):
        reason = f"{setting}: {reason}"
    compiled = "compiled blocks" if rt.get("compile") else "eager"
    parts = [compiled + (f" ({reason})" if reason else "")
             + (f"; compile took {dec['compile_seconds']:.1f} s" if dec.get("compile_seconds") is not None else ""),
             f"capture kernel {_resolved(rt.get('capture_kernel'), rt.get('capture_kernel_resolved'))} "
             f"on the {rt.get('capture_stream', 'inline')} stream",
             f"attention backend {rt.get('attention_backend')}"]
    if rt.get("bytecode_cache"):
        parts.append(f"bytecode cache `{rt['bytecode_cache']}` (torch was installed without bytecode)")
    return ["- runtime: " + "; ".join(parts)]


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
    from .errors import RunDirError

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
