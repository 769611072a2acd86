"""Process-group helpers for running under `torchrun` (each rank takes a disjoint share of the prompts)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share: every world_size-th item starting at rank (disjoint, union is everything)."""
        return items[self.rank :: self.world_size]

    def device(self) -> str:
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return "cpu"


def setup() -> DistContext:
    """Join the process group if launched by torchrun/accelerate (WORLD_SIZE > 1); gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
        ctx.initialized_here = True
    return ctx


def gather_to_main(ctx: DistContext, obj):
    """A list with every rank's `obj` on rank 0 (None elsewhere); `[obj]` when not distributed."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def teardown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.barrier()
        if ctx.initialized_here:
            dist.destroy_process_group()
