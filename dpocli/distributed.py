"""One code path for 1 process and N torchrun processes.

`current()` detects a torchrun launch (RANK / WORLD_SIZE / LOCAL_RANK in the environment),
initialises torch.distributed once (NCCL on GPU, gloo on CPU) and returns a `DistContext`. In a
plain single process every collective is a no-op that returns what one rank would, so drivers
call them unconditionally and never branch on "am I distributed".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        """Each rank gets its own GPU (by LOCAL_RANK); CPU stays CPU."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def max_over_ranks(self, value: int) -> int:
        return max(self.all_gather_object(value))

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (a sync point); returns `tensor`."""
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor


_context: DistContext | None = None


def current() -> DistContext:
    global _context
    if _context is not None:
        return _context
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DPOCLI_BACKEND") != "gloo" \
            else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend=backend)
    if tdist.is_initialized():
        _context = DistContext(tdist.get_rank(), tdist.get_world_size(),
                               int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _context = DistContext()
    return _context


def shutdown() -> None:
    global _context
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _context = None
