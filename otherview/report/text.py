"""The report's tables and the sentences beside them: the card's Results table, per-group and per-unit
tables, the specificity and replication sections, and the number formats they share."""

from __future__ import annotations

import math

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


def _f2(x) -> str:
    return "—" if x is None else f"{x:.2f}"


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
