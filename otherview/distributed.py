"""Scale-out with accelerate: one experiment's probe batches shared by several processes (GPUs, hosts).

Under ``accelerate launch`` (which sets ``WORLD_SIZE``) every process loads the model once and runs
the probe batches ``k`` with ``k % world == rank``; the per-pass unit values (small) are gathered to
the main process, which writes the run directory and the report. The statistics phase is shared: the
main process broadcasts the per-pass values, every process runs the same analyses, and each sign-flip
null's flips are split into one range per process (:meth:`Context.flip_split`), each counted on the
process's own device and summed (integer counts: bitwise the one-process null). The reference
images are made once, on the main process, and sent to the others. Batches keep the
single-process composition (same size, same padding), so the values do not depend on the process
count: bitwise on the CPU (at equal threads per process); on GPUs up to the kernels' own
nondeterminism.

Without ``WORLD_SIZE`` (a plain ``otherview exec``) this is a one-process context and nothing is
imported from accelerate.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops.signflip import FlipSplit


@dataclass
class Context:
    """This process's place in the run: its rank, the number of processes, and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the process's device under accelerate; None: the spec's
    state: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_batches(self, n_batches: int) -> list[int]:
        """Return the probe batch indices this process runs (round robin over processes)."""
        return list(range(self.rank, n_batches, self.world))

    def broadcast(self, obj: Any) -> Any:
        """Return the main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Return every process's ``obj`` (in rank order) on the main process, None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the elementwise sum of every process's ``tensor`` (same shape and dtype), on every process."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def flip_split(self) -> FlipSplit | None:
        """Return how this process shares a sign-flip null's flips; None in one process (no split)."""
        return None if self.world == 1 else FlipSplit(self.rank, self.world, self.all_sum)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def context(device: str = "auto") -> Context:
    """Return the process context: accelerate's when launched by it, else a one-process context."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Context()
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)  # gloo on the CPU, NCCL on GPUs
    dev = torch.device("cpu") if cpu else state.device
    return Context(rank=state.process_index, world=state.num_processes, device=dev, state=state)


def images_to_bytes(images: list) -> list[bytes]:
    """Return PIL images as PNG bytes (lossless, for sending between processes)."""
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def images_from_bytes(blobs: list[bytes]) -> list:
    """Return the PIL images of PNG bytes."""
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
