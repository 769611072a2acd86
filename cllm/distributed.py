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


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if ctx.world_size > 1:
        dist.barrier()


def teardown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.barrier()
        if ctx.initialized_here:
            dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process launched as one rank of several (WORLD_SIZE > 1) once its work is saved and the group is gone.

    Every output file is closed and the process group destroyed before this runs, yet at interpreter exit the
    C++ side of gloo/DeepSpeed can still abort with "terminate called without an active exception" (seen in
    CI after a finished ZeRO-3 run: exit code 250 although every file was written). The launcher then reports
    a failed job. So a rank flushes its streams and leaves with its own exit code, skipping the C++ static
    destructors. Single-process runs exit normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise SystemExit(code)
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to flush
            pass
    os._exit(code)
