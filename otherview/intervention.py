"""Interventions: forward pre-hooks that overwrite chosen units' channels of each site's input.

The same sites as capture (``plan.sites``, found by fully qualified module name), the same token
segment each site's units were measured on, and the same guarantee: ``attach`` returns an
``Intervention`` whose ``detach`` (or ``with`` exit) removes every hook, after which the model computes
bitwise what it computed before. Each row of a batch carries its own channel mask, so one batch can
hold several unit sets (the selected set and random sets) at once.

What replaces the masked channels, per site: zeros (``source`` None), or a tensor the driver points
the hook at before each evaluation: ``[1, seg_tokens, width]`` (the mean over passes) or
``[batch, seg_tokens, width]`` (per row: the other condition's input of the same cell, recorded by a
``Recorder`` on an earlier batch). FLUX.2: in double-stream blocks ``to_out.0`` sees the image stream
only; a single-stream ``to_out`` input is ``[attention heads | MLP hidden]``, so a unit there is one
or the other and masks are built from the plan's units.
"""

from __future__ import annotations

import logging
import torch

from .capture import HookSet
from .plan import Plan, Site

log = logging.getLogger(__name__)


class InterventionError(Exception):
    """A site named by the plan is not a module of the model, or a hook got an input of the wrong shape."""


def _modules(transformer: torch.nn.Module, plan: Plan) -> dict[str, torch.nn.Module]:
    modules = dict(transformer.named_modules())
    missing = [s.name for s in plan.sites if s.name not in modules]
    if missing:
        raise InterventionError(f"no module named '{missing[0]}' in {type(transformer).__name__}")
    return {s.name: modules[s.name] for s in plan.sites}


def channel_masks(plan: Plan, unit_sets: list[list[int]], device) -> dict[str, torch.Tensor]:
    """Return, per site, each unit set's input-channel mask.

    Parameters
    ----------
    plan : Plan
    unit_sets : list of list of int
        Unit indices (the run's unit axis) of each set.

    Returns
    -------
    masks : dict of site name -> torch.Tensor, shape (n_sets, site.width), bool
    """
    masks = {s.name: torch.zeros(len(unit_sets), s.width, dtype=torch.bool) for s in plan.sites}
    for k, units in enumerate(unit_sets):
        for i in units:
            u = plan.units[i]
            masks[u.site][k, u.channel_start:u.channel_end] = True
    return {name: m.to(device) for name, m in masks.items()}


class _Slot:
    """One site's state that its hook reads: the site's own tensors, never a lookup by site name.

    Under regional compilation (one graph per block class, reused by every block of the class)
    whatever a hook reads from its closure is guarded; a per-site Python value (a site name used as
    a dict key, an offset) would fail the guard at the next block and recompile per site. Tensors
    held here are graph inputs whose guards (dtype, shape) are equal across the sites of a class.
    """

    __slots__ = ("mask", "source", "target", "total")

    def __init__(self, mask: torch.Tensor | None = None) -> None:
        self.mask = mask  # bool [max_batch, width] (Intervention)
        self.source: torch.Tensor | None = None  # what replaces the masked channels; None: zeros
        self.target: torch.Tensor | None = None  # Recorder: where the segment is copied
        self.total: torch.Tensor | None = None  # Recorder: fp32 [seg, width] to add weighted rows into


class Intervention(HookSet):
    """Pre-hooks that overwrite the masked channels of each site's input while ``active``.

    ``masks``: per site, bool ``[max_batch, width]``, the current batch's rows first. ``sources``
    (assign a dict of site name -> tensor; a site left out gets zeros): ``[1, seg_tokens, width]``
    shared by every row, or ``[rows, seg_tokens, width]`` read at ``source_rows`` (int64 ``[max_batch]``).
    """

    def __init__(self, plan: Plan, masks: dict[str, torch.Tensor]) -> None:
        self.plan = plan
        self.masks = masks
        self.slots = {name: _Slot(m) for name, m in masks.items()}
        self.source_rows: torch.Tensor | None = None
        self.handles: list = []
        self.active = True

    @property
    def sources(self) -> dict[str, torch.Tensor]:
        return {name: s.source for name, s in self.slots.items() if s.source is not None}

    @sources.setter
    def sources(self, values: dict[str, torch.Tensor | None]) -> None:
        for name, slot in self.slots.items():
            slot.source = values.get(name)

    def set_rows(self, set_masks: dict[str, torch.Tensor], row_sets: torch.Tensor) -> None:
        """Give the batch's rows their sets' masks (``row_sets``: int64 [batch], on the device; no sync)."""
        b = row_sets.shape[0]
        for name, m in self.masks.items():
            m[:b].copy_(set_masks[name].index_select(0, row_sets))



def _splice(x: torch.Tensor, seg: tuple[int, int], new: torch.Tensor) -> torch.Tensor:
    s0, s1 = seg
    if s0 == 0 and s1 == x.shape[1]:
        return new
    return torch.cat([x[:, :s0], new, x[:, s1:]], dim=1)


def _make_hook(iv: Intervention, site: Site):
    # Only values equal across a block class are Python constants here (segment, token count); the
    # site's own state is its slot's tensors (see _Slot).
    slot, seg_range, tokens, name = iv.slots[site.name], (int(site.segment[0]), int(site.segment[1])), int(site.tokens), site.name

    def hook(module, args):
        if not iv.active:
            return None
        x = args[0]
        if x.shape[1] != tokens:
            raise InterventionError(f"{name} received {x.shape[1]} tokens, the plan expects {tokens}")
        b = x.shape[0]
        mask = slot.mask[:b, None, :]  # [b, 1, width]
        seg = x[:, seg_range[0]:seg_range[1]]
        src = slot.source
        if src is None:
            new = seg.masked_fill(mask, 0)
        else:
            if src.shape[0] != 1:  # gathered here, one site at a time: a batch's copy of every site would not fit
                src = src.index_select(0, iv.source_rows[:b]) if iv.source_rows is not None else src[:b]
            new = torch.where(mask, src.to(x.dtype), seg)
        return (_splice(x, seg_range, new), *args[1:])

    return hook


def attach(transformer: torch.nn.Module, plan: Plan, max_batch: int, device) -> Intervention:
    """Return an ``Intervention`` with one forward pre-hook on each of ``plan``'s sites (all masks empty)."""
    modules = _modules(transformer, plan)
    iv = Intervention(plan=plan, masks={s.name: torch.zeros(max_batch, s.width, dtype=torch.bool, device=device)
                                        for s in plan.sites})
    try:
        for site in plan.sites:
            iv.handles.append(modules[site.name].register_forward_pre_hook(_make_hook(iv, site)))
            log.debug("intervention hook on %s", site.name)
    except BaseException:
        iv.detach()
        raise
    return iv


class Recorder(HookSet):
    """Read-only pre-hooks that copy (or add up) each site's input segment into buffers the driver sets.

    ``targets`` (assign a dict of site name -> ``[rows, seg, width]``): each site's segment is copied
    into its target's rows (a padded batch's extra rows are not). ``sums`` (site name -> fp32
    ``[seg, width]``): the rows weighted by ``weights`` (fp32 ``[batch]``, 0 for padding) are added in.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.slots = {s.name: _Slot() for s in plan.sites}
        self.weights: torch.Tensor | None = None
        self.handles: list = []
        self.active = True

    @property
    def targets(self) -> dict[str, torch.Tensor]:
        return {name: s.target for name, s in self.slots.items() if s.target is not None}

    @targets.setter
    def targets(self, values: dict[str, torch.Tensor]) -> None:
        for name, slot in self.slots.items():
            slot.target = values.get(name)

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        return {name: s.total for name, s in self.slots.items() if s.total is not None}

    @sums.setter
    def sums(self, values: dict[str, torch.Tensor]) -> None:
        for name, slot in self.slots.items():
            slot.total = values.get(name)



def _make_recorder(rec: Recorder, site: Site):
    slot, s0, s1 = rec.slots[site.name], int(site.segment[0]), int(site.segment[1])

    def hook(module, args):
        if rec.active:
            seg = args[0][:, s0:s1]
            target = slot.target
            if target is not None:
                n = min(seg.shape[0], target.shape[0])
                target[:n].copy_(seg[:n])
            total = slot.total
            if total is not None:
                total += torch.einsum("b,btc->tc", rec.weights, seg.float())
        return None

    return hook


def record(transformer: torch.nn.Module, plan: Plan) -> Recorder:
    """Return a ``Recorder`` with one read-only forward pre-hook on each of ``plan``'s sites."""
    modules = _modules(transformer, plan)
    rec = Recorder(plan=plan)
    try:
        for site in plan.sites:
            rec.handles.append(modules[site.name].register_forward_pre_hook(_make_recorder(rec, site)))
    except BaseException:
        rec.detach()
        raise
    return rec
