"""What was run, in words: the Methods section (from the resolved spec), its references, and the
Provenance lines on memory and on how each ``auto`` was resolved."""

from __future__ import annotations

from typing import Any

from .text import _bh_floor, _n

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
