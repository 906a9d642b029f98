"""The report's "Causal test" section, from ``causal.json`` and ``causal.safetensors`` alone.

``with_causal(run_dir, text)`` puts the section before the report's References when the run has a
causal follow-up (``otherview causal``), drawing its figures: the random sets' effects with the
selected set's marked, and (when the follow-up decoded images) A, A under the intervention, and B.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import figures as figures_mod
from . import store

WHAT = {"zero": "set to zero", "mean": "set to their mean over the passes of both conditions (per token, step and "
        "channel)", "patch": "replaced by their values in the other condition's pass of the same item, scene, seed "
        "and wording"}


def random_sets_figure(path: Path, random: np.ndarray, selected: float, p: float) -> str:
    """Draw the histogram of the random sets' mean effects with the selected set's marked; return its caption."""
    plt = figures_mod.plt
    fig, ax = plt.subplots(figsize=(figures_mod.WIDTH, 2.0), layout="constrained")
    bins = min(30, max(5, len(np.unique(random))))
    lo, hi = min(random.min(), selected), max(random.max(), selected)
    span = hi - lo or 1.0
    ax.hist(random, bins=bins, range=(lo - 0.02 * span, hi + 0.02 * span), color=figures_mod.NULL_GREY,
            label=f"{len(random)} random sets")
    ax.axvline(selected, color=figures_mod.OBSERVED, label=f"selected (p = {p:.3g})")
    ax.set_xlabel("mean share of the A-to-B gap closed (toward)")
    ax.set_ylabel("random sets")
    ax.legend(loc="upper left", frameon=False)
    figures_mod._save(fig, path)
    return ("The selected units' mean effect (vermillion) among the effects of random unit sets matched to them in "
            "count per site and kind (grey).")


def images_figure(path: Path, images: np.ndarray, items: list[str], rows: list[str]) -> str:
    """Draw decoded images, one column per item and one row per condition; return its caption."""
    plt = figures_mod.plt
    n_rows, n = images.shape[:2]
    fig, axes = plt.subplots(n_rows, n, figsize=(figures_mod.WIDTH, figures_mod.WIDTH * n_rows / max(n, 1) + 0.3),
                             squeeze=False, layout="constrained")
    for r in range(n_rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(items[c][:22], fontsize=6)
            if c == 0:
                ax.set_ylabel(rows[r][:28], fontsize=6)
    figures_mod._save(fig, path)
    return "Rows: " + "; ".join(rows) + " (the middle row: the intervention on the selected units). Columns: items."


def _draw(run_dir: Path, record: dict, arrays: dict, mark: str) -> list[tuple[str, str]]:
    out = run_dir / "figures"
    out.mkdir(exist_ok=True)
    r = record["result"]
    mean = arrays["toward"].mean(axis=1)
    figs = [("figures/causal_random_sets.png", random_sets_figure,
             (out / "causal_random_sets.png", mean[1:], float(mean[0]), r["p_permutation"]))]
    if "images" in arrays and record.get("images"):
        figs.append(("figures/causal_images.png", images_figure,
                     (out / "causal_images.png", arrays["images"], record["images"]["items"], record["images"]["rows"])))
    return [(path, figures_mod._draw((path, draw, args, mark))) for path, draw, args in figs]


def section(run_dir: str | Path, record: dict, arrays: dict, mark: str = "") -> list[str]:
    """Return the "Causal test" section's lines (drawing its figures into ``run_dir/figures``)."""
    sel, c, r = record["selection"], record["contrast"], record["result"]
    rs, n = record["random_sets"], len(record["items"])
    how = {"top": f"the {sel['count']} units with the largest |t| for `{sel['analysis']}`",
           "specificity": f"the {sel['count']} strongest units passing the specificity test `{sel['analysis']}`",
           "list": f"{sel['count']} units named by hand"}[sel["how"]]
    strata = "; ".join(f"{s['count']} {s['kind']} in `{s['site']}`" for s in sel["strata"])
    lines = ["## Causal test", "",
             f"**Set.** {how} ({strata}). **Intervention.** In every probe pass of **{c['a']}** (contrast {c['label']}), "
             f"the units' input channels of their projection are {WHAT[record['intervention']]}, on the tokens they were "
             f"measured on; the other units are untouched. **Outcome.** Per item (N = {n}), the share of the gap between "
             f"the unchanged predictions of {c['a']} and {c['b']} (predicted velocity of the target tokens over "
             f"{record['cells']} pass cells) that the intervention closes along that gap: toward = "
             "⟨v_A′ − v_A, v_B − v_A⟩ / ‖v_B − v_A‖² (1: the prediction moves all the way to B's along the gap; 0: not at "
             "all); moved = ‖v_A′ − v_A‖ / ‖v_B − v_A‖ is the change in any direction. **Control.** "
             f"{rs['count']} random unit sets matched in count per site and kind (seed {rs['seed']}; "
             f"{rs['distinct_sets_run']} distinct sets run, the selected included)."
             + (f" {rs['equal_to_selected']} of the random draws are the selected set itself (its strata are small), "
                "which bounds how small p can be." if rs["equal_to_selected"] else ""), "",
             "| set | mean toward | mean moved |", "|---|---|---|",
             f"| selected | {r['selected_mean_toward']:.3g} | {r['selected_mean_moved']:.3g} |",
             f"| random (median; 95th percentile) | {r['random_median_toward']:.3g}; {r['random_q95_toward']:.3g} | "
             f"{float(np.median(r['random_mean_moved'])):.3g} |", "",
             f"The selected set ranks {r['rank']} of {rs['count'] + 1} by mean toward: permutation p = "
             f"{r['p_permutation']:.3g} (one-sided, (1 + #random ≥ selected) / (R + 1)). " + _across_items(r), "",
             "What this shows: whether changing these units' inputs moves the model's prediction for "
             f"{c['a']} towards {c['b']}'s more than changing as many units of the same sites and kinds chosen at random. "
             "What it does not show: that the units compute the difference alone or in this way elsewhere (other "
             "interventions, outcomes, steps or prompts can answer differently); the units were chosen on these same "
             "items, so the set is not an out-of-sample prediction"
             + ("; and on random weights it says nothing about a trained model." if record["model"]["random_weights"]
                else "."), ""]
    for k, (path, caption) in enumerate(_draw(Path(run_dir), record, arrays, mark), 1):
        if record.get("images") and path.endswith("causal_images.png"):
            caption = caption + " " + record["images"]["what"][0].upper() + record["images"]["what"][1:] + "."
        lines += [f"![Causal figure {k}]({path})", "", f"**Causal figure {k}.** {caption}", ""]
    return lines


def _without_section(text: str) -> str:
    """Return report.md's text with any Causal test section already in it taken out."""
    start = text.find("## Causal test\n")
    if start < 0:
        return text
    end = text.find("\n## ", start + 1)
    return text[:start] + (text[end + 1:] if end >= 0 else "")


def with_causal(run_dir: str | Path, text: str) -> str:
    """Return ``text`` (report.md) with the Causal test section before its References, if the run has one."""
    run_dir = Path(run_dir)
    text = _without_section(text)
    if not (run_dir / "causal.json").exists():
        return text
    record = store.read_json(run_dir / "causal.json")
    arrays = store.read_tensors(run_dir / "causal.safetensors")
    mark = "RANDOM WEIGHTS" if record["model"].get("random_weights") else ""
    block = "\n".join(section(run_dir, record, arrays, mark)) + "\n"
    at = text.find("\n## References")
    return text + "\n" + block if at < 0 else text[: at + 1] + block + text[at + 1:]


def update_report(run_dir: str | Path) -> Path:
    """Put the Causal test section into ``run_dir``'s report.md without redrawing the run's own figures."""
    path = Path(run_dir) / "report.md"
    store.atomic_write_text(path, with_causal(run_dir, path.read_text()))
    return path


def _t_phrase(t: float, p: float) -> str:
    """Return "t = .., p = .." or, where the per-item values do not vary (t infinite or undefined), say so."""
    if not np.isfinite(t):
        return "no t: the per-item values do not vary"
    return f"t = {t:.2f}, p = {p:.3g}"


def _across_items(r: dict) -> str:
    """Return the sentence on the per-item tests (against 0, and paired against the random sets' mean)."""
    zero = _t_phrase(r["t_vs_zero"], r["p_vs_zero"])
    rand = _t_phrase(r.get("t_vs_random", float("nan")), r.get("p_vs_random", float("nan")))
    return (f"Across items its toward is {r['selected_mean_toward']:.3g} (one-sample against 0: {zero}); against the "
            f"random sets' per-item mean (paired): {rand}.")
