"""Figures of a run, drawn from its run directory alone (matplotlib, Agg, PNG at 200 dpi).

Each figure is sized for one journal column (3.5 in wide, text >= 7 pt) and has labelled axes with
units: the site x unit map of t, the null distributions of the threshold counts with the observed
count, units over each threshold per block split into attention and MLP channels, and the axis
response of the units that follow it best.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import store

# matplotlib.pyplot, imported on first use by _pyplot: `exec`'s own process never draws (its figure
# workers do, and import it while the GPU works), so its startup does not pay for matplotlib.
plt = None


def _pyplot():
    """Return matplotlib.pyplot on the Agg backend, importing it the first time."""
    global plt
    if plt is None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot

        plt = pyplot
    return plt

WIDTH = 3.5  # inches: one column
DPI = 200
ATTENTION, MLP, OBSERVED, NULL_GREY = "#0072B2", "#E69F00", "#D55E00", "#7f7f7f"  # Okabe-Ito
STYLE = {"font.size": 7, "axes.labelsize": 7, "axes.titlesize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
         "lines.linewidth": 0.9, "axes.spines.top": False, "axes.spines.right": False}
TOP_AXIS_UNITS = 4
MAP_COLUMNS = 400  # at most this many columns in the t map (~1.4 px each at 200 dpi); more are pooled


@dataclass
class Figure:
    """A figure written into the run directory: its path relative to the run and its caption."""

    path: str
    caption: str


_MARK = ""  # set per job by _draw: "RANDOM WEIGHTS" on every figure of a random-weight run


def _save(fig, path: Path) -> None:
    """Write ``fig`` as PNG through the run store's atomic write, and close it."""
    if _MARK:
        # A strip of its own below the axes, so the stamp never sits on a colour bar's label.
        strip = 9 / (fig.get_figheight() * 72)
        engine = fig.get_layout_engine()
        if engine is not None and hasattr(engine, "set") and "rect" in engine.get():
            engine.set(rect=(0, strip, 1, 1 - strip))
        fig.text(0.995, 0.002, _MARK, ha="right", va="bottom", fontsize=6, color=OBSERVED, fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    store.atomic_write_bytes(path, buf.getvalue())


def _site_groups(sites: list[dict]) -> list[list[dict]]:
    """Return the sites split into panels of one stream and kind, in plan order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for s in sites:
        groups.setdefault((s["stream"], s["stream_kind"]), []).append(s)
    return list(groups.values())


def _pool_max_abs(grid: np.ndarray, factor: int) -> np.ndarray:
    """Return ``grid`` (rows, columns) with each run of ``factor`` columns replaced by its value of largest |x|.

    A column-width figure has fewer pixels than a single-stream block has units: pooling keeps the
    strongest unit of each pixel visible, where resampling would drop or average it away.
    """
    if factor <= 1:
        return grid
    rows, cols = grid.shape
    padded = np.full((rows, -(-cols // factor) * factor), np.nan)
    padded[:, :cols] = grid
    blocks = padded.reshape(rows, -1, factor)
    pick = np.where(np.isnan(blocks), -1.0, np.abs(blocks)).argmax(axis=2)
    return np.take_along_axis(blocks, pick[..., None], axis=2)[..., 0]


def t_map(path: Path, t: np.ndarray, sites: list[dict], contrast: str, unit_width: int = 16) -> str:
    """Draw the site x unit map of t (rows: blocks; columns: units, attention then MLP); return its caption."""
    groups = _site_groups(sites)
    width = max(s["n_units"] for s in sites)
    rows = [len(g) for g in groups]
    finite = np.abs(t[np.isfinite(t)])
    vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    clipped = bool(finite.size and finite.max() > vmax)
    pool = -(-width // MAP_COLUMNS)
    height = 0.9 + sum(max(r * 0.11, 0.35) for r in rows)
    fig, axes = plt.subplots(len(groups), 1, figsize=(WIDTH, height), squeeze=False, sharex=True, layout="constrained",
                             gridspec_kw={"height_ratios": [max(r, 3) for r in rows]})
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")
    for ax, group in zip(axes[:, 0], groups):
        grid = np.full((len(group), width), np.nan)
        for i, s in enumerate(group):
            grid[i, : s["n_units"]] = t[s["unit_offset"]: s["unit_offset"] + s["n_units"]]
        image = ax.imshow(np.clip(_pool_max_abs(grid, pool), -vmax, vmax), aspect="auto", cmap=cmap, vmin=-vmax,
                          vmax=vmax, interpolation="nearest", extent=(0, pool * -(-width // pool), len(group), 0))
        ax.set_xlim(0, width)
        step = max(1, int(np.ceil(len(group) / 10)))
        ax.set_yticks(np.arange(0, len(group), step) + 0.5, [s["label"] for s in group[::step]])
        ax.tick_params(axis="y", length=2)
        attn = group[0]["attention_units"]
        if 0 < attn < group[0]["n_units"]:
            ax.axvline(attn, color="k", lw=0.6, ls="--")
            top = ax.secondary_xaxis("top")
            top.set_xticks([attn / 2, (attn + group[0]["n_units"]) / 2], ["attention", "MLP"])
            top.tick_params(length=0, pad=1)
            top.spines["top"].set_visible(False)
        if group[0]["n_units"] < width:
            ax.text((group[0]["n_units"] + width) / 2, 0.5, "no units\n(attention output only)", ha="center",
                    va="center", transform=ax.get_xaxis_transform(), color="#555555")
    axes[-1, 0].set_xlabel(f"unit ({unit_width}-channel group of the projection input)")
    fig.supylabel("block", fontsize=7)
    bar = fig.colorbar(image, ax=axes[:, 0], orientation="horizontal", fraction=0.06, aspect=35,
                       extend="both" if clipped else "neither")
    bar.set_label(f"paired t ({contrast})")
    _save(fig, path)
    return (f"Paired t of every unit ({contrast}), one row per block (D: double-stream, S: single-stream), units "
            "in channel order (attention heads, "
            "then MLP hidden channels in single-stream blocks). Diverging colour scale centred at 0"
            + (f", clipped at |t| = {vmax:.1f} (99.5th percentile of |t|)" if clipped else "")
            + (f"; each column shows the largest-|t| unit of {pool} neighbours." if pool > 1 else "."))


def _histogram(hist: np.ndarray, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Return (fractions, edges) of a count histogram, rebinned to at most ``bins`` bins over its support."""
    hist = np.asarray(hist, dtype=np.float64)
    top = int(np.flatnonzero(hist)[-1]) if hist.any() else 0
    width = max(1, int(np.ceil((top + 1) / bins)))
    n_bins = (top + 1 + width - 1) // width
    padded = np.zeros(n_bins * width)
    padded[: top + 1] = hist[: top + 1]
    return padded.reshape(n_bins, width).sum(axis=1) / max(hist.sum(), 1), np.arange(n_bins + 1) * width - 0.5


def _label_line(ax, x: float, text: str, y: float, color: str, left: bool) -> None:
    """Write ``text`` beside a vertical line at ``x``, ``y`` in axes fraction, on its left or right."""
    ax.annotate(text, xy=(x, y), xycoords=("data", "axes fraction"), xytext=(-2 if left else 2, 0),
                textcoords="offset points", ha="right" if left else "left", va="top", color=color)


def null_counts(path: Path, count_hist: np.ndarray, card_table: list[dict], quantile: float, n_units: int) -> str:
    """Draw, per threshold, the sign-flip null of the number of units over it, observed marked; return caption."""
    rows = [r for r in card_table if r["threshold"] is not None]
    qname = f"p{quantile * 100:g}"
    fig, axes = plt.subplots(len(rows), 1, figsize=(WIDTH, 0.5 + 1.15 * len(rows)), squeeze=False, layout="constrained")
    for ax, row, hist in zip(axes[:, 0], rows, count_hist):
        hist = np.array(hist, dtype=np.int64)
        obs, nq = row["observed"], row["null_q"]
        if obs < hist.size and hist[obs] > 0 and hist.sum() > 1:
            hist[obs] -= 1  # the identity flip is the observation itself: drawn as the line
        frac, edges = _histogram(hist)
        null_artist = ax.stairs(frac, edges, fill=True, color=NULL_GREY, alpha=0.7)
        q_artist = ax.axvline(nq, color="k", ls=":", lw=0.8)
        right = max(edges[-1], nq + 1)
        text = f"{obs:,} ({row['fraction']:.0%})"
        on_scale = obs <= max(3 * right, 20)  # else an arrow at the edge instead of squashing the null to a line
        if on_scale:
            right = max(right, obs) * 1.1 + 1
            ax.axvline(obs, color=OBSERVED, lw=1.2)
            _label_line(ax, obs, text, 0.8, OBSERVED, left=obs > nq)
        else:
            right *= 1.5  # room right of the null for the arrow's label
            ax.annotate(text + " →", xy=(1.0, 0.8), xycoords="axes fraction", ha="right", va="top", color=OBSERVED)
        _label_line(ax, nq, f"{nq:,.0f}", 0.98, "k", left=False)
        ax.set_xlim(-0.5 - 0.02 * right, right)
        ax.set_ylim(0, max(frac.max(), 1e-9) * 1.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel(f"units with |t| > {row['threshold']:g} (of {n_units:,})")
        ax.set_ylabel("fraction of flips")
    observed_artist = plt.Line2D([], [], color=OBSERVED, lw=1.2)
    fig.legend([null_artist, q_artist, observed_artist], ["sign-flip null", f"null {qname}", "observed"],
               loc="outside upper center", ncol=3, frameon=False, handlelength=1.5)
    _save(fig, path)
    return (f"Sign-flip null distribution of the number of units over each |t| threshold (grey; the identity "
            f"flip, which is the observation, is drawn as the line), its {qname} (dotted) and the observed count "
            "(vermillion; an arrow at the right edge when far off the null's scale).")


def block_bars(path: Path, sites: list[dict], thresholds: list[float]) -> str:
    """Draw, per threshold, the units over it in each block, stacked attention / MLP; return its caption."""
    fig, axes = plt.subplots(len(thresholds), 1, figsize=(WIDTH, 0.5 + 1.2 * len(thresholds)), squeeze=False,
                             sharex=True, layout="constrained")
    x = np.arange(len(sites))
    total = np.array([s["units"] for s in sites])
    for ax, c in zip(axes[:, 0], thresholds):
        attn = np.array([s[f"over_{c:g}_attention"] for s in sites])
        mlp = np.array([s[f"over_{c:g}"] for s in sites]) - attn
        ax.bar(x, total, width=0.8, fill=False, edgecolor="#bbbbbb", lw=0.5, label="units in block")
        ax.bar(x, attn, width=0.8, color=ATTENTION, label="attention")
        ax.bar(x, mlp, bottom=attn, width=0.8, color=MLP, label="MLP")
        ax.set_ylabel(f"units with |t| > {c:g}")
        ax.set_ylim(0, total.max() * 1.05)
    axes[0, 0].legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False, borderaxespad=0.1,
                      handlelength=1.2)
    ax = axes[-1, 0]
    ax.set_xticks(x, [s["label"] for s in sites], rotation=90)
    ax.set_xlim(-0.6, len(sites) - 0.4)
    ax.set_xlabel("block (D: double-stream, S: single-stream)")
    _save(fig, path)
    return ("Units over each |t| threshold per block, attention-head channels (blue) and MLP channels (orange); "
            "the outline is the block's number of units.")


def _short(text: str, n: int = 22) -> str:
    for article in ("a ", "an ", "the "):
        if text.lower().startswith(article):
            text = text[len(article):]
            break
    return text if len(text) <= n else text[: n - 1] + "…"


def axis_units(path: Path, d: np.ndarray, covariate: np.ndarray, fillers: list[str], units: list[dict],
               axis_name: str, contrast: str) -> str:
    """Draw d against axis position for the units that follow the axis best; return its caption."""
    fig, axes = plt.subplots(len(units), 1, figsize=(WIDTH, 1.3 + 0.85 * len(units)), squeeze=False, sharex=True,
                             layout="constrained")
    order = np.argsort(covariate, kind="stable")
    peak = max(float(np.abs(d[:, u["unit"]]).max()) for u in units)
    exponent = int(np.floor(np.log10(peak))) if peak > 0 else 0
    exponent = exponent if not -1 <= exponent <= 2 else 0
    for ax, u in zip(axes[:, 0], units):
        y = d[:, u["unit"]] / 10.0**exponent
        ax.axhline(0, color="#bbbbbb", lw=0.6)
        ax.plot(covariate[order], y[order], color=ATTENTION if u["kind"] == "attention" else MLP, lw=0.7)
        ax.plot(covariate, y, "o", ms=2.2, color="k")
        kind = "MLP" if u["kind"] == "mlp" else f"head {u['head']}"
        ax.set_title(f"unit {u['unit']} ({u['label']}, {kind}): ρ = {u['axis_rho']:+.2f}, "
                     f"p$_{{FWER}}$ = {u['axis_p_fwer']:.2g}", loc="left", pad=2)
    ax = axes[-1, 0]
    step = max(1, -(-len(fillers) // 40))  # 40 labels fill a column at 7 pt
    ax.set_xticks(covariate[order][::step], [_short(fillers[i]) for i in order[::step]], rotation=90)
    ax.set_xlabel(f"{axis_name} (axis rank)")
    fig.supylabel(f"d ({contrast}, RMS" + (f", ×10$^{{{exponent}}}$)" if exponent else ")"), fontsize=7)
    _save(fig, path)
    return (f"Per-pair difference d ({contrast}, RMS units) against each {axis_name}'s position on the axis for "
            f"the {len(units)} units with the strongest rank correlation (ρ: Spearman; p_FWER: max-|ρ| "
            "permutation null).")


def specificity_scatter(path: Path, t_effect: np.ndarray, t_control: np.ndarray, passed: np.ndarray,
                        effect: str, control: str) -> str:
    """Draw t(effect) against t(control) per unit, the conjunction's units marked; return its caption."""
    fig, ax = plt.subplots(figsize=(WIDTH, WIDTH * 0.9), layout="constrained")
    finite = np.isfinite(t_effect) & np.isfinite(t_control)
    te, tc, ok = t_effect[finite], t_control[finite], passed[finite]
    lim = float(np.percentile(np.abs(np.concatenate([te, tc])), 99.9)) if te.size else 1.0
    lim = max(lim, 1.0) * 1.05
    ax.scatter(tc[~ok], te[~ok], s=1.5, color=NULL_GREY, alpha=0.5, lw=0, label="other units", rasterized=True)
    ax.scatter(tc[ok], te[ok], s=2.5, color=OBSERVED, lw=0, label="pass the conjunction", rasterized=True)
    ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.6, ls=":")
    ax.axhline(0, color="#bbbbbb", lw=0.5)
    ax.axvline(0, color="#bbbbbb", lw=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(f"paired t, control ({control})")
    ax.set_ylabel(f"paired t, effect ({effect})")
    ax.legend(loc="upper left", frameon=False, markerscale=3)
    _save(fig, path)
    clipped = int((~finite).sum())
    return (f"Per unit, the paired t of the effect ({effect}) against that of the control ({control}); vermillion: "
            "units passing the specificity conjunction (effect and effect − control significant after family-wise "
            "correction, same sign); dotted: equal t." + (f" {clipped} units with infinite t are not drawn." if clipped
                                                           else ""))


def write_figures(run_dir: Path, manifest: dict, summary: dict, workers=None) -> list[Figure]:
    """Draw every figure of a run into ``run_dir/figures`` from the run's files; return them in order."""
    run_dir = Path(run_dir)
    arrays = store.read_tensors(run_dir / "rms.safetensors")
    null = store.read_tensors(run_dir / "null.safetensors")
    out = run_dir / "figures"
    out.mkdir(exist_ok=True)
    jobs = []
    for s in summary["specificity"]:
        name = f"{s['key']}.specificity.png"
        jobs.append((f"figures/{name}", specificity_scatter,
                     (out / name, arrays[f"{s['effect']}/t"], arrays[f"{s['control']}/t"],
                      arrays[f"{s['key']}/passed"].astype(bool), s["effect_label"], s["control_label"])))
    single = len(summary["analyses"]) == 1
    for a in summary["analyses"]:
        key, contrast, axis = a["key"], a["label"], a["axis"]
        prefix = "" if single else f"{key}."
        jobs += [(f"figures/{prefix}t_map.png", t_map, (out / f"{prefix}t_map.png", arrays[f"{key}/t"],
                                                         summary["layout"]["sites"], contrast,
                                                         summary["layout"]["unit_width"])),
                 (f"figures/{prefix}null_counts.png", null_counts,
                  (out / f"{prefix}null_counts.png", null[f"{key}/count_hist"], a["card_table"], a["null"]["quantile"],
                   summary["n_units"])),
                 (f"figures/{prefix}block_bars.png", block_bars,
                  (out / f"{prefix}block_bars.png", a["groups"]["sites"], a["null"]["thresholds"]))]
        if axis["top_units"]:
            jobs.append((f"figures/{prefix}axis_units.png", axis_units,
                         (out / f"{prefix}axis_units.png", arrays[f"{key}/d"], np.asarray(axis["ranks"]),
                          axis["fillers"], axis["top_units"][:TOP_AXIS_UNITS], axis["name"], contrast)))
    mark = "RANDOM WEIGHTS" if manifest.get("random_weights") else ""
    jobs = [(*job, mark) for job in jobs]
    return [Figure(path, caption) for (path, _, _, _), caption in zip(jobs, _draw_all(jobs, workers))]


def _draw(job) -> str:
    global _MARK
    _, draw, args, mark = job
    _MARK = mark
    with _pyplot().rc_context(STYLE):
        return draw(*args)


def _noop(_: int) -> None:
    return None


def _worker_init(parent: int) -> None:
    """Worker initializer: import matplotlib now, and end with the process that forked this worker.

    A forked worker inherits both ends of the pool's pipes, so it would never see them close if
    the parent died without shutting the pool down (killed, or ``os._exit``); Linux's parent-death
    signal ends it instead. Elsewhere the pool's normal shutdown is all there is.
    """
    _die_with_parent(parent)
    _pyplot()


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os._exit(0)


def start_workers(n: int = 4) -> ProcessPoolExecutor | None:
    """Return a pool of ``n`` forked figure workers, started now; None where the OS cannot fork.

    ``exec`` starts them before the model loads: forking a small process is quick, forking one that
    holds a GPU context and gigabytes of weights takes seconds. Workers only draw numpy arrays, and
    none outlives the process that started it (see ``_die_with_parent``); stop them with
    :func:`stop_workers`.
    """
    n = min(n, os.cpu_count() or 1)
    if n < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    # The first submit forks every worker (a fork pool never spawns later); not waiting for it lets
    # the workers import matplotlib while this process goes on loading the model.
    pool.submit(_noop, 0)
    return pool


def stop_workers(pool: ProcessPoolExecutor | None) -> None:
    """Stop ``pool``'s workers and wait for them (they are idle once the figures are drawn: milliseconds)."""
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _draw_all(jobs: list, workers: ProcessPoolExecutor | None = None) -> list[str]:
    """Return the captions of ``jobs``, drawn in parallel worker processes where the OS can fork.

    Each figure takes about half a second in matplotlib, most of it layout.
    """
    if workers is not None:
        return list(workers.map(_draw, jobs))
    pool = start_workers(len(jobs))
    if pool is None:
        return [_draw(job) for job in jobs]
    with pool:
        return list(pool.map(_draw, jobs))
