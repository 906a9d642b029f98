"""The causal follow-up's passes: the probe passes of A and B unchanged, then A under interventions.

Each pass is the probe's pass (``interpreter.run_probes``): its prompt embedding, its seed's noise, its
scene's reference latents, the same steps, guidance and scheduler; only the conditional evaluations
are intervened on (with CFG the unconditional one is the same empty prompt for A and B). What comes
back is the predicted velocity of the target tokens at every step, in fp32.

Intervened passes are (unit set, cell) rows, batched across sets: a batch holds several sets at
once, each row with its own channel mask. Patching needs B's site inputs of the same cell: cells are
taken in chunks, B's passes of a chunk run first with a ``Recorder`` copying every site's input
segment, then every set's A' passes of that chunk read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import compiling
from . import intervention as iv_mod
from .design import ProbePass
from .probes import ProbeInputs
from .plan import Plan


@dataclass
class Forward:
    """A loaded model with the probe's fixed inputs: runs rows of passes through the probe's steps."""

    loaded: object
    plan: Plan
    inputs: ProbeInputs
    negative: torch.Tensor | None  # the empty prompt's embedding where the probe uses real CFG

    @torch.no_grad()
    def __call__(self, rows: list[ProbePass], before_step: Callable[[int], None] | None = None,
                 hooks: tuple = (), x0: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the velocity of the target tokens per step, fp32 ``[rows, steps, target_tokens, channels]``.

        ``before_step(step)`` runs before each conditional evaluation (points the hooks at that step's
        buffers); ``hooks`` (objects with ``active``) are switched off for the unconditional one. With
        ``x0`` also the last step's clean-image estimate ``latents - sigma * v`` ``[rows, target, channels]``.
        """
        from .probes import batch_inputs, probe_timesteps

        pipe, dev, plan, inp = self.loaded.pipe, self.loaded.device, self.plan, self.inputs
        transformer, spec = pipe.transformer, plan.spec
        b, steps, guidance = len(rows), spec.probe.steps, spec.probe.guidance_scale
        _, embeds, text_ids, latents, img_ids, ref = batch_inputs(inp, rows, dev)  # exactly as run_probes
        timesteps = probe_timesteps(pipe, plan, dev)
        out, last = [], None
        for step, t in enumerate(timesteps):
            timestep = t.expand(b).to(latents.dtype) / 1000
            model_input = torch.cat([latents, ref], dim=1).to(transformer.dtype)
            if before_step is not None:
                before_step(step)
            v = transformer(hidden_states=model_input, timestep=timestep, guidance=None, encoder_hidden_states=embeds,
                            txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0][:, : latents.shape[1]]
            if self.negative is not None:
                for h in hooks:
                    h.active = False
                try:
                    neg = transformer(hidden_states=model_input, timestep=timestep, guidance=None,
                                      encoder_hidden_states=self.negative.expand(b, -1, -1), txt_ids=text_ids,
                                      img_ids=img_ids, return_dict=False)[0][:, : latents.shape[1]]
                finally:
                    for h in hooks:
                        h.active = True
                v = neg + guidance * (v - neg)
            out.append(v.float())
            if x0 and step == len(timesteps) - 1:
                last = (latents.float() - pipe.scheduler.sigmas[step].to(latents.device).float() * v.float())
            if step < len(timesteps) - 1:
                latents = pipe.scheduler.step(v, t, latents, return_dict=False)[0]
        return torch.stack(out, dim=1), last


def make_forward(loaded, plan: Plan, inputs: ProbeInputs) -> Forward:
    """Return a ``Forward`` for the probe of ``plan`` (encoding the empty prompt where the probe uses CFG)."""
    spec, pipe = plan.spec, loaded.pipe
    negative = None
    if spec.probe.guidance_scale > 1 and not pipe.config.is_distilled:
        negative, _ = pipe.encode_prompt(prompt=[""], device=loaded.device, max_sequence_length=plan.text_tokens,
                                         text_encoder_out_layers=plan.arch.text_encoder_out_layers)
        negative = negative.to(loaded.dtype)
    return Forward(loaded, plan, inputs, negative)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _padded(rows: list, size: int) -> list:
    """Return ``rows`` padded to ``size`` by repeating its last row (results of the copies are dropped).

    Every batch then has one shape, so compiled blocks reuse one graph instead of compiling another
    for a short last batch (as ``interpreter.run_probes`` does).
    """
    return list(rows) + [rows[-1]] * (size - len(rows))


@torch.no_grad()
def baseline(fwd: Forward, passes: list[ProbePass], batch_size: int, mean: bool = False):
    """Return every pass's velocity, its captured RMS, and (with ``mean``) the mean site inputs.

    Returns
    -------
    velocity : torch.Tensor, shape (passes, steps, target_tokens, channels), float32
    rms : ndarray, shape (passes, n_units)
        The capture hooks' RMS over the probe's steps, as ``exec`` measured it (to check the reload).
    means : dict of site name -> torch.Tensor, shape (steps, 1, seg_tokens, width)
        Per site, step, token and channel, the mean over all the given passes, in the model's dtype
        (accumulated in fp32); empty without ``mean``.
    """
    from . import capture as capture_mod

    plan, dev = fwd.plan, fwd.loaded.device
    steps = plan.spec.probe.steps
    transformer = fwd.loaded.pipe.transformer
    cap = capture_mod.attach(transformer, plan, torch.zeros(batch_size, 1, plan.n_units, device=dev))
    rec = iv_mod.record(transformer, plan) if mean else None
    sums = {s.name: torch.zeros(steps, s.segment[1] - s.segment[0], s.width, device=dev) for s in plan.sites} if mean else {}
    preds, rms = [], []
    size = min(batch_size, len(passes))
    try:
        for a, z in _batches(len(passes), batch_size):
            rows = _padded(passes[a:z], size)
            cap.reset(len(rows))
            if rec is not None:
                rec.weights = (torch.arange(len(rows), device=dev) < z - a).float()  # padding rows add nothing

            def point(step: int) -> None:
                cap.evaluations += 1
                if rec is not None:
                    rec.sums = {name: s[step] for name, s in sums.items()}

            v, _ = fwd(rows, before_step=point, hooks=(cap, rec) if rec else (cap,))
            preds.append(v[: z - a])
            rms.append(cap.rms().numpy()[: z - a])
    finally:
        cap.detach()
        if rec is not None:
            rec.detach()
    means = {name: (s / len(passes)).to(fwd.loaded.dtype)[:, None] for name, s in sums.items()}
    return torch.cat(preds), np.concatenate(rms), means


@dataclass
class Accumulator:
    """Per set and item sums of <v_A' - v_A, v_B - v_A> and ||v_A' - v_A||^2 (float64, on the host)."""

    dot: np.ndarray
    moved_sq: np.ndarray

    def add(self, sets: np.ndarray, items: np.ndarray, v: torch.Tensor, va: torch.Tensor, vb: torch.Tensor) -> None:
        diff = v - va
        d = (diff * (vb - va)).flatten(1).sum(1).double().cpu().numpy()  # one copy per batch
        m = diff.square().flatten(1).sum(1).double().cpu().numpy()
        np.add.at(self.dot, (sets, items), d)
        np.add.at(self.moved_sq, (sets, items), m)


def _record_sources(fwd: Forward, rec: iv_mod.Recorder, iv: iv_mod.Intervention, passes: list[ProbePass]) -> dict:
    """Return B's site inputs for ``passes``, unintervened: ``{site: [steps, passes, seg_tokens, width]}``."""
    plan, dev = fwd.plan, fwd.loaded.device
    rec.targets = {}
    tables = {s.name: torch.empty(plan.spec.probe.steps, len(passes), s.segment[1] - s.segment[0], s.width,
                                  device=dev, dtype=fwd.loaded.dtype) for s in plan.sites}

    def keep(step: int) -> None:
        rec.targets = {name: tab[step] for name, tab in tables.items()}

    iv.active, rec.active = False, True
    try:
        with compiling.eager():  # a chunk of B's passes, not a probe batch's shape: no graph of its own
            fwd(passes, before_step=keep, hooks=(rec,))
    finally:
        rec.active, iv.active, rec.targets = False, True, {}
    return tables


@torch.no_grad()
def intervened(fwd: Forward, mode: str, set_masks: dict[str, torch.Tensor], cells: list[tuple[ProbePass, ProbePass]],
               cell_items: np.ndarray, pred_a: torch.Tensor, pred_b: torch.Tensor, batch_size: int, chunk: int,
               acc: Accumulator, means: dict | None = None, progress: Callable[[str], None] | None = None,
               x0_cells: int = 0, on_batch: Callable[[], None] | None = None) -> torch.Tensor | None:
    """Run A' = A under each set's intervention for every cell, adding the outcome sums into ``acc``.

    ``cells``: (A pass, B pass) per cell; ``pred_a``/``pred_b``: their unchanged velocities. With
    ``x0_cells`` > 0, return set 0's last-step clean estimates of the first ``x0_cells`` cells.
    Every batch is padded to one shape (``min(batch_size, sets x cells)`` rows); ``on_batch()`` runs
    after each, once its results are on the host.
    """
    plan, dev = fwd.plan, fwd.loaded.device
    transformer = fwd.loaded.pipe.transformer
    n_sets = next(iter(set_masks.values())).shape[0]
    iv = iv_mod.attach(transformer, plan, batch_size, dev)
    rec = iv_mod.record(transformer, plan) if mode == "patch" else None
    rows_idx = torch.zeros(batch_size, dtype=torch.long, device=dev)
    iv.source_rows = rows_idx
    x0_out = []
    size = min(batch_size, n_sets * len(cells))
    try:
        for c0, c1 in _batches(len(cells), chunk):
            iv.sources = {}  # let the last chunk's recordings go before the next is allocated
            tables = _record_sources(fwd, rec, iv, [cells[j][1] for j in range(c0, c1)]) if rec is not None else None
            rows = [(k, j) for k in range(n_sets) for j in range(c0, c1)]
            for a, z in _batches(len(rows), batch_size):
                part = _padded(rows[a:z], size)
                n = z - a
                sets = np.array([k for k, _ in part])
                js = np.array([j for _, j in part])
                iv.set_rows(set_masks, torch.as_tensor(sets, device=dev))
                rows_idx[: len(part)].copy_(torch.as_tensor(js - c0))

                def point(step: int) -> None:
                    if mode == "zero":
                        iv.sources = {}
                    elif mode == "mean":
                        iv.sources = {name: m[step] for name, m in means.items()}
                    else:
                        iv.sources = {name: tab[step] for name, tab in tables.items()}

                want = x0_cells > 0 and bool(((sets[:n] == 0) & (js[:n] < x0_cells)).any())
                v, x0 = fwd([cells[j][0] for j in js], before_step=point, hooks=(iv,), x0=want)
                sets, js, v = sets[:n], js[:n], v[:n]  # the padding rows' results are dropped
                jt = torch.as_tensor(js, device=dev)
                acc.add(sets, cell_items[js], v, pred_a.index_select(0, jt), pred_b.index_select(0, jt))
                if want:
                    keep_rows = np.flatnonzero((sets == 0) & (js < x0_cells))
                    x0_out += [(int(js[r]), x0[r]) for r in keep_rows]
                if on_batch is not None:
                    on_batch()
            if progress is not None:
                progress(f"intervened passes: cells {c1}/{len(cells)} x {n_sets} sets")
    finally:
        iv.detach()
        if rec is not None:
            rec.detach()
    if not x0_out:
        return None
    return torch.stack([x for _, x in sorted(x0_out, key=lambda p: p[0])])


@torch.no_grad()
def decode(loaded, plan: Plan, latents: torch.Tensor) -> np.ndarray:
    """Return packed latents ``[n, target_tokens, channels]`` decoded by the VAE: uint8 ``[n, H, W, 3]``."""
    pipe = loaded.pipe
    # The probe's noise is packed row-major from a (channels, h, w) grid (``prepare_latents``).
    h, w = plan.height // (pipe.vae_scale_factor * 2), plan.width // (pipe.vae_scale_factor * 2)
    x = latents.reshape(latents.shape[0], h, w, -1).permute(0, 3, 1, 2).to(pipe.vae.dtype)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(x)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(x)
    x = pipe._unpatchify_latents(x * std + mean)
    image = pipe.vae.decode(x, return_dict=False)[0]
    image = pipe.image_processor.postprocess(image, output_type="np")
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def cells_of(plan: Plan, a: str, b: str) -> tuple[list, np.ndarray]:
    """Return (A pass, B pass) of every cell, item-major, and each cell's item."""
    design = plan.design
    ca, cb = design.conditions.index(a), design.conditions.index(b)
    cells, items = [], []
    n, s, e, w = design.cell.shape[1:]
    for i in range(n):
        for si in range(s):
            for ei in range(e):
                for wi in range(w):
                    cells.append((design.passes[design.cell[ca, i, si, ei, wi]],
                                  design.passes[design.cell[cb, i, si, ei, wi]]))
                    items.append(i)
    return cells, np.asarray(items)


def chunk_size(plan: Plan, device: torch.device, dtype: torch.dtype, batch_size: int) -> int:
    """Return how many cells' recorded site inputs (patching) fit beside the model: a quarter of free memory."""
    per_cell = plan.spec.probe.steps * sum((s.segment[1] - s.segment[0]) * s.width for s in plan.sites)
    per_cell *= torch.finfo(dtype).bits // 8
    if device.type != "cuda":
        return max(1, min(batch_size, int(2**30 // per_cell)))
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(batch_size, int(free * 0.25 // per_cell)))


def images(fwd, req, plan, masks, cells, cell_items, pred_a, pred_b, means, first) -> np.ndarray:
    """Return decoded clean estimates ``[3, n, H, W, 3]`` uint8: A, A' (selected set), B for the first items.

    Run eager: a few rows are not worth a compiled graph of their own.
    """
    chosen = [first[i] for i in sorted(first)[: req.images]]
    sub = [cells[j] for j in chosen]
    scratch = Accumulator(np.zeros((1, len(cell_items))), np.zeros((1, len(cell_items))))
    sel_masks = {k: m[:1] for k, m in masks.items()}
    with compiling.eager():
        x0_sel = intervened(fwd, req.intervention, sel_masks, sub, np.arange(len(sub)), pred_a[chosen],
                            pred_b[chosen], len(sub), len(sub), scratch, means, x0_cells=len(sub))
        _, x0_a = fwd([c[0] for c in sub], x0=True)
        _, x0_b = fwd([c[1] for c in sub], x0=True)
    return np.stack([decode(fwd.loaded, plan, x) for x in (x0_a, x0_sel, x0_b)])
