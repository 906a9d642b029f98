"""The causal follow-up: intervene on the units a probe found, against matched random unit sets.

Over a finished run directory: the model the run recorded is loaded again, the plan is rebuilt from
the recorded spec, the prompts and the saved reference images are encoded as ``exec`` encoded them,
and the probe passes of one contrast's two conditions (A: positive weight, B: negative) run again:
first unchanged, then A with an intervention on a unit set (the selected set, and R random sets
matched to it in count per site and kind). Every pass keeps its seed's noise and its scene's
reference, so only the prompt and the intervention differ.

Outcome, per item (its scenes, seeds, wordings and steps taken together; target tokens only):
``toward = <v_A' - v_A, v_B - v_A> / ||v_B - v_A||^2``, the share of the A-to-B gap in predicted
velocity that the intervention closes, measured along the gap (1: A' lands on B's prediction along
that direction; 0: no movement along it; it is linear in v_A'). Beside it, ``moved = ||v_A' - v_A|| /
||v_B - v_A||``, the size of the change in any direction. The selected set's mean ``toward`` over
items is ranked among the random sets': p = (1 + #{random >= selected}) / (R + 1). Interventions and
metric choices change such answers (Zhang & Nanda 2024); patching from the other condition is the one
that asks "do these units carry the difference".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import compiling
from . import intervention as iv_mod
from . import model as model_mod
from . import store
from .plan import Plan

log = logging.getLogger(__name__)

INTERVENTIONS = ("zero", "mean", "patch")
SCHEMA_VERSION = 1
Progress = Callable[[str], None]


class CausalError(Exception):
    """The follow-up cannot run as asked: ``(option, message)`` per problem."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in problems))


@dataclass
class Request:
    """What to test: which units, which contrast, which intervention, how many random sets."""

    contrast: str | None = None  # an analysis key: "<contrast>" or "<contrast>.step<k>"
    top: int | None = None
    units: list[int] | None = None
    specificity: str | None = None
    intervention: str = "patch"
    random_sets: int = 100
    seed: int = 0
    images: int = 0
    model: str | None = None
    batch_size: int | None = None
    compile: str | None = None  # "auto", "on" or "off"; None: the run's runtime.compile


@dataclass
class Selection:
    """The selected units and how they were chosen."""

    units: list[int]
    how: str
    analysis: str | None  # the analysis whose t ranked them (None for an explicit list)
    contrast: str  # the contrast whose conditions the intervention uses


@dataclass
class RunContext:
    """A run directory read back: its manifest, arrays and rebuilt plan."""

    run_dir: Path
    manifest: dict
    summary: dict
    arrays: dict[str, np.ndarray]
    plan: Plan


def load_run(run_dir: str | Path, model_override: str | None = None) -> RunContext:
    """Return a finished run directory's manifest, summary, arrays and the plan rebuilt from its spec."""
    from .design import build_design
    from .plan import build_plan
    from .spec import Spec

    run_dir = Path(run_dir)
    for name in ("manifest.json", "summary.json", "rms.safetensors"):
        if not (run_dir / name).exists():
            raise CausalError([("RUN_DIR", f"{run_dir} has no {name}: not a finished run directory")])
    manifest = store.read_json(run_dir / "manifest.json")
    if manifest.get("status") != "complete":
        raise CausalError([("RUN_DIR", f"{run_dir} is a run with status '{manifest.get('status')}', not complete")])
    spec = Spec.model_validate(manifest["spec"])
    source = model_override or manifest["model"]["source"]
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"source": source})})
    from .design import DesignError
    from .plan import PlanError

    try:
        plan = build_plan(spec, model_mod.architecture(source), build_design(spec))
    except (DesignError, PlanError) as exc:
        raise CausalError([(f"manifest.spec.{p}" if p else "manifest.spec", m) for p, m in exc.problems]) from None
    arrays = store.read_tensors(run_dir / "rms.safetensors")
    if arrays["rms"].shape[1] != plan.n_units:
        raise CausalError([("--model", f"{source} has {plan.n_units} units under this spec; the run has "
                            f"{arrays['rms'].shape[1]}: the units would not be the same")])
    return RunContext(run_dir, manifest, store.read_json(run_dir / "summary.json"), arrays, plan)


def _contrast_of(ctx: RunContext, key: str) -> str:
    a = next((a for a in ctx.plan.design.analyses if a.key == key), None)
    if a is None:
        keys = ", ".join(a.key for a in ctx.plan.design.analyses)
        raise CausalError([("--contrast", f"no analysis '{key}' in this run (it has: {keys})")])
    return a.contrast


def select_units(ctx: RunContext, req: Request) -> Selection:
    """Return the unit set a request names: an explicit list, a contrast's top K by |t|, or a specificity test's."""
    plan, arrays = ctx.plan, ctx.arrays
    ways = sum(x is not None for x in (req.units, req.specificity)) + (req.units is None and req.specificity is None
                                                                       and req.contrast is not None)
    if ways != 1:
        raise CausalError([("", "name the units one way: --units LIST, --contrast NAME --top K, or --specificity NAME")])
    if req.units is not None:
        bad = [u for u in req.units if not 0 <= u < plan.n_units]
        if bad or not req.units or len(set(req.units)) != len(req.units):
            raise CausalError([("--units", f"give distinct unit indices in 0..{plan.n_units - 1}"
                                + (f" (got {bad[0]})" if bad else ""))])
        contrast = _contrast_of(ctx, req.contrast) if req.contrast else plan.design.contrasts[0].name
        return Selection(sorted(req.units), "list", None, contrast)
    top = req.top if req.top is not None else 10
    if not 1 <= top <= plan.n_units:
        raise CausalError([("--top", f"must be between 1 and the run's {plan.n_units} units")])
    if req.specificity is not None:
        tests = {s["key"]: s for s in ctx.summary["specificity"]} | {s["name"]: s for s in ctx.summary["specificity"]}
        s = tests.get(req.specificity)
        if s is None:
            raise CausalError([("--specificity", f"no specificity test '{req.specificity}' in this run"
                                + (f" (it has: {', '.join(sorted(tests))})" if tests else ""))])
        passed = np.flatnonzero(arrays[f"{s['key']}/passed"].astype(bool))
        if not len(passed):
            raise CausalError([("--specificity", f"no unit passed '{req.specificity}': there is nothing to test")])
        score = np.minimum(np.abs(arrays[f"{s['effect']}/t"][passed]), np.abs(arrays[f"{s['difference']}/t"][passed]))
        units = passed[np.argsort(-score, kind="stable")][:top]
        contrast = _contrast_of(ctx, req.contrast) if req.contrast else _contrast_of(ctx, s["effect"])
        return Selection(sorted(int(u) for u in units), "specificity", s["key"], contrast)
    contrast = _contrast_of(ctx, req.contrast)
    t = arrays[f"{req.contrast}/t"]
    units = np.argsort(-np.abs(t), kind="stable")[:top]
    return Selection(sorted(int(u) for u in units), "top", req.contrast, contrast)


def strata(plan: Plan, units: list[int]) -> dict[tuple[str, str], int]:
    """Return how many of ``units`` fall in each (site, kind) stratum, in plan order."""
    out: dict[tuple[str, str], int] = {}
    for i in units:
        key = (plan.units[i].site, plan.units[i].kind)
        out[key] = out.get(key, 0) + 1
    return out


def random_sets(plan: Plan, units: list[int], count: int, seed: int) -> list[list[int]]:
    """Return ``count`` unit sets drawn at random, each matched to ``units`` in count per site and kind.

    Each set draws, within every (site, kind) stratum of the selection, as many units as the selection
    has there, without replacement, from all that stratum's units (the selected ones included: under
    the null the selection is one more draw). Sets are independent draws (numpy PCG64, ``seed``), so two
    sets may coincide where strata are small; each is sorted.
    """
    rng = np.random.default_rng(seed)
    pools: dict[tuple[str, str], np.ndarray] = {}
    for u in plan.units:
        pools.setdefault((u.site, u.kind), [])
        pools[(u.site, u.kind)].append(u.index)
    want = strata(plan, units)
    sets = []
    for _ in range(count):
        drawn = [rng.choice(np.asarray(pools[key]), size=n, replace=False) for key, n in want.items()]
        sets.append(sorted(int(x) for x in np.concatenate(drawn)))
    return sets


def condition_pair(plan: Plan, contrast: str) -> tuple[str, str]:
    """Return the contrast's (A, B) conditions: its one positive and one negative weight."""
    c = plan.design.contrast(contrast)
    pos = [k for k, w in zip(plan.design.conditions, c.weights) if w > 0]
    neg = [k for k, w in zip(plan.design.conditions, c.weights) if w < 0]
    if len(pos) != 1 or len(neg) != 1:
        raise CausalError([("--contrast", f"{contrast} ({c.label}) weighs {len(pos) + len(neg)} conditions; the causal "
                            "test needs a contrast of two conditions, A - B")])
    return pos[0], neg[0]


@dataclass
class Effects:
    """Per set and item: the share of the A-to-B gap closed along it, and the relative size of the change."""

    toward: np.ndarray  # (n_sets, n_items), float64; set 0 is the selected set
    moved: np.ndarray  # (n_sets, n_items), float64
    gap: np.ndarray  # (n_items,): ||v_B - v_A|| over the item's cells


def effects(dot: np.ndarray, moved_sq: np.ndarray, gap_sq: np.ndarray) -> Effects:
    """Return per-item effects from per-set, per-item sums.

    Parameters
    ----------
    dot : ndarray, shape (n_sets, n_items)
        Sum over the item's cells of <v_A' - v_A, v_B - v_A>.
    moved_sq : ndarray, shape (n_sets, n_items)
        Sum over the item's cells of ||v_A' - v_A||^2.
    gap_sq : ndarray, shape (n_items,)
        Sum over the item's cells of ||v_B - v_A||^2; must be positive (A and B must differ).
    """
    gap_sq = np.asarray(gap_sq, dtype=np.float64)
    if not np.all(np.isfinite(dot)) or not np.all(np.isfinite(moved_sq)) or not np.all(np.isfinite(gap_sq)):
        raise CausalError([("", "non-finite predictions: the model produced NaN or inf under the intervention")])
    if np.any(gap_sq <= 0):
        raise CausalError([("", f"{int((gap_sq <= 0).sum())} item(s) have identical A and B predictions: no gap to close")])
    return Effects(np.asarray(dot, np.float64) / gap_sq, np.sqrt(np.asarray(moved_sq, np.float64) / gap_sq),
                   np.sqrt(gap_sq))


def _t_and_p(x: np.ndarray) -> tuple[float, float]:
    """Return the one-sample t of ``x`` against 0 and its two-sided p (Student, N - 1 df)."""
    from scipy import stats as sps

    from .stats import paired_t

    t = float(paired_t(np.asarray(x, np.float64)[:, None])[0])
    n = len(x)
    p = float(2 * sps.t.sf(abs(t), n - 1)) if n > 1 and np.isfinite(t) else (0.0 if n > 1 else 1.0)
    return t, p


def compare(eff: Effects) -> dict:
    """Return the selected set's effect against the random sets'.

    The permutation p ranks the selected set's mean ``toward`` among the R random sets' (one-sided:
    larger is a stronger move towards B): p = (1 + #{random >= selected}) / (R + 1), never 0. The
    paired test across items compares the selected set's per-item ``toward`` with the random sets'
    per-item mean (t and two-sided Student p, N - 1 df); the one-sample test asks whether it is 0.
    """
    mean = eff.toward.mean(axis=1)
    sel, rnd = mean[0], mean[1:]
    r = len(rnd)
    out = {"selected_mean_toward": float(sel), "selected_mean_moved": float(eff.moved[0].mean()),
           "random_mean_toward": [float(x) for x in rnd], "random_mean_moved": [float(x) for x in eff.moved[1:].mean(1)],
           "p_permutation": float((1 + np.sum(rnd >= sel)) / (r + 1)), "rank": int(1 + np.sum(rnd > sel)),
           "random_median_toward": float(np.median(rnd)) if r else None,
           "random_q95_toward": float(np.quantile(rnd, 0.95)) if r else None}
    out["t_vs_zero"], out["p_vs_zero"] = _t_and_p(eff.toward[0])
    if r:
        out["t_vs_random"], out["p_vs_random"] = _t_and_p(eff.toward[0] - eff.toward[1:].mean(axis=0))
    return out


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, start: float, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.seconds[name] = round(now - start, 3)
        return now


def _reference_images(ctx: RunContext) -> list:
    """Return the run's saved reference images (one per scene), as ``exec`` conditioned on them."""
    from PIL import Image

    scenes = ctx.plan.design.scenes
    names = ["reference.png"] if len(scenes) == 1 else [f"reference-{sc.name}.png" for sc in scenes]
    missing = [n for n in names if not (ctx.run_dir / n).exists()]
    if missing:
        raise CausalError([("RUN_DIR", f"{ctx.run_dir} has no {missing[0]}: the probe's reference cannot be rebuilt")])
    return [Image.open(ctx.run_dir / n).convert("RGB") for n in names]


def _check_request(req: Request) -> None:
    if req.intervention not in INTERVENTIONS:
        raise CausalError([("--intervention", f"one of {', '.join(INTERVENTIONS)}")])
    if req.random_sets < 1:
        raise CausalError([("--random-sets", "at least 1")])


def _reproduced(ctx: RunContext, passes: list, rms: np.ndarray) -> float | None:
    """Return the largest relative difference between the reloaded model's RMS and the run's (None: per-step run)."""
    design = ctx.plan.design
    if design.steps != [None]:
        return None
    old = ctx.arrays["rms"][[design.row(p.index, 0) for p in passes]].astype(np.float64)
    return float(np.max(np.abs(rms - old) / np.maximum(np.abs(old), 1e-12)))


def run_causal(run_dir: str | Path, req: Request, progress: Progress | None = None,
               loaded: model_mod.LoadedModel | None = None) -> dict:
    """Run the causal follow-up on a finished run directory; write ``causal.json`` and ``causal.safetensors``.

    Returns the record written to ``causal.json``. ``loaded`` reuses a model already loaded from the
    run's source (tests).
    """
    from . import causal_passes as passes_mod
    from . import memory
    from .probes import auto_batch_size, prepare_probe_inputs

    say = progress or (lambda msg: log.info(msg))
    _check_request(req)
    ctx = load_run(run_dir, req.model)
    plan, spec = ctx.plan, ctx.plan.spec
    sel = select_units(ctx, req)
    a, b = condition_pair(plan, sel.contrast)
    sets = [sel.units] + random_sets(plan, sel.units, req.random_sets, req.seed)
    distinct = list(dict.fromkeys(tuple(s) for s in sets))  # each distinct set is run once
    clock, start = Timings(), time.perf_counter()
    if loaded is None:
        say(f"loading {spec.model.source}")
        loaded = model_mod.load(spec.model.source, spec.model.dtype, spec.model.device)
    dev = loaded.device
    start = clock.mark("load_model", start, dev)
    fwd = passes_mod.make_forward(loaded, plan, prepare_probe_inputs(loaded, plan, _reference_images(ctx)))
    start = clock.mark("encode", start, dev)
    cells, cell_items = passes_mod.cells_of(plan, a, b)
    resident = memory.plan_memory(plan, dev, placement="resident") if not (req.batch_size or plan.batch_size) else None
    batch = req.batch_size or plan.batch_size or auto_batch_size(plan, dev, resident)  # every weight stays resident
    decision = compiling.decide_for_plan(plan, req.compile or spec.runtime.compile, dev, batch,
                                         spec.runtime.compile_backend, passes=(2 + len(distinct)) * len(cells),
                                         hooks=f"causal:{req.intervention}")
    compiling.compile_for(decision, loaded.pipe.transformer)
    say(f"compile: {decision.reason}")
    say(f"baseline: {2 * len(cells)} passes of {a} and {b}" + (" (the first batch compiles)" if decision.compile else ""))
    order = [c[0] for c in cells] + [c[1] for c in cells]
    with compiling.probe_stance(decision):
        base, rms, means = passes_mod.baseline(fwd, order, batch, mean=req.intervention == "mean")
    drift = _reproduced(ctx, order, rms)
    if drift is not None and drift > 1e-2:
        say(f"warning: the reloaded model's RMS differ from the run's by up to {drift:.3g} (relative)")
    pred_a, pred_b = base[: len(cells)], base[len(cells):]
    start = clock.mark("baseline", start, dev)
    n_items = len(plan.design.items)
    acc = passes_mod.Accumulator(np.zeros((len(distinct), n_items)), np.zeros((len(distinct), n_items)))
    masks = iv_mod.channel_masks(plan, [list(s) for s in distinct], dev)
    say(f"intervention ({req.intervention}) on {len(distinct)} distinct unit sets x {len(cells)} cells of {a}, "
        f"batches of {batch}")
    batches = compiling.BatchClock()  # the first intervened batch compiles the intervention's graphs
    with compiling.probe_stance(decision):
        passes_mod.intervened(fwd, req.intervention, masks, cells, cell_items, pred_a, pred_b, batch,
                              passes_mod.chunk_size(plan, dev, loaded.dtype, batch), acc, means, say,
                              on_batch=batches.wrap(None))
    batches.finish(decision)
    compiling.release(background=True)
    start = clock.mark("intervened", start, dev)
    gap_sq = np.zeros(n_items)
    np.add.at(gap_sq, cell_items, (pred_b - pred_a).square().flatten(1).sum(1).double().cpu().numpy())
    which = np.array([distinct.index(tuple(s)) for s in sets])
    eff = effects(acc.dot[which], acc.moved_sq[which], gap_sq)
    first = {int(i): j for j, i in reversed(list(enumerate(cell_items)))}  # each item's first cell
    pictures = (passes_mod.images(fwd, req, plan, masks, cells, cell_items, pred_a, pred_b, means, first)
                if req.images else None)
    clock.mark("images", start, dev)
    record = _record(ctx, req, sel, (a, b), sets, len(distinct), eff, compare(eff), len(cells), batch, loaded, clock)
    record["reproduced_rms_max_relative_difference"] = drift
    record["compile"] = decision.record()
    _write(ctx, record, eff, sets, pictures, [plan.design.items[i].value for i in sorted(first)[: req.images]])
    return record


def _write(ctx: RunContext, record: dict, eff: Effects, sets: list, pictures, items: list[str]) -> None:
    """Write ``causal.safetensors`` and ``causal.json`` (atomically, the JSON last)."""
    a, b = record["contrast"]["a"], record["contrast"]["b"]
    arrays = {"toward": eff.toward, "moved": eff.moved, "gap": eff.gap, "sets": np.asarray(sets, dtype=np.int64)}
    if pictures is not None:
        arrays["images"] = pictures
        record["images"] = {"items": items, "rows": [a, f"{a} + {record['intervention']}", b],
                            "what": "the last probe step's clean-image estimate (latents - sigma * velocity), decoded "
                                    "by the VAE: a one-step probe from pure noise shows what one prediction holds, "
                                    "not a finished generation"}
    store.write_tensors(ctx.run_dir / "causal.safetensors", arrays)
    store.write_json(ctx.run_dir / "causal.json", record)


def _record(ctx, req, sel, pair, sets, n_distinct, eff, result, n_cells, batch, loaded, clock) -> dict:
    """Return ``causal.json``'s record: what was tested, how, and what came out."""
    plan = ctx.plan
    a, b = pair
    t = ctx.arrays.get(f"{sel.analysis}/t") if sel.analysis else None
    if sel.how == "specificity":
        s = next(s for s in ctx.summary["specificity"] if s["key"] == sel.analysis)
        t = ctx.arrays[f"{s['effect']}/t"]
    units = []
    for i in sel.units:
        u = plan.units[i]
        units.append({"unit": i, "site": u.site, "block": u.block, "stream": u.stream, "kind": u.kind,
                      "head": u.head, "channels": f"{u.channel_start}-{u.channel_end - 1}",
                      "t": None if t is None else float(t[i])})
    c = plan.design.contrast(sel.contrast)
    return {"schema_version": SCHEMA_VERSION, "created": store.now(), "git_sha": store.git_sha(),
            "versions": store.versions(), "device": store.device_info(loaded.device),
            "model": {"source": plan.spec.model.source, "dtype": str(loaded.dtype).replace("torch.", ""),
                      "random_weights": plan.arch.random_weights},
            "selection": {"how": sel.how, "analysis": sel.analysis, "top": req.top, "count": len(sel.units),
                          "units": units, "strata": [{"site": k[0], "kind": k[1], "count": n}
                                                     for k, n in strata(plan, sel.units).items()]},
            "contrast": {"name": c.name, "label": c.label, "a": a, "b": b},
            "intervention": req.intervention,
            "outcome": {"name": "toward", "definition": "<v_A' - v_A, v_B - v_A> / ||v_B - v_A||^2 per item, over "
                        "its scenes, seeds, wordings, steps and target tokens (v: predicted velocity)",
                        "secondary": "moved = ||v_A' - v_A|| / ||v_B - v_A||"},
            "random_sets": {"count": req.random_sets, "seed": req.seed, "distinct_sets_run": n_distinct,
                            "equal_to_selected": sum(tuple(s) == tuple(sets[0]) for s in sets[1:]),
                            "matched": "count per site and kind", "generator": "numpy PCG64"},
            "items": [it.value for it in plan.design.items], "cells": n_cells,
            "passes": {"baseline": 2 * n_cells, "intervened": n_distinct * n_cells, "batch_size": batch},
            "result": result, "per_item_toward": [float(x) for x in eff.toward[0]],
            "per_item_moved": [float(x) for x in eff.moved[0]], "seconds": clock.seconds,
            "run": {"spec_hash": ctx.manifest.get("spec_hash"), "model": ctx.manifest["model"]["source"]}}
