"""Processes of a multi-process launch (torchrun, or `accelerate launch`, which runs torchrun).

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous address. `collect`
needs no communication (each rank takes every world_size-th shard); `distill` forms a
process group (NCCL on GPUs, gloo on CPU) to sum gradients. The process group is PyTorch's
own state; nothing here keeps any.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """torchrun and `accelerate launch` both export RANK / WORLD_SIZE / LOCAL_RANK."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def device_for(info: DistInfo, requested: str | None = None) -> str:
    if requested:
        return requested
    if torch.cuda.is_available():
        return f"cuda:{info.local_rank % torch.cuda.device_count()}"
    return "cpu"


@contextmanager
def process_group(info: DistInfo, device: str, timeout_s: float) -> Iterator[None]:
    """Join the launch's process group for the duration of a stage (no-op for one process).

    `timeout_s` bounds every collective: a rank whose peer died fails instead of waiting
    forever (gloo also fails at once when a peer's socket closes; torchrun then stops the
    remaining ranks).
    """
    import torch.distributed as dist

    if not info.distributed or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (identity for one process)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_share(total: int, info: DistInfo) -> range:
    """The contiguous slice of `total` items rank `info.rank` handles (sizes differ by <= 1)."""
    base, extra = divmod(total, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return range(start, start + base + (1 if info.rank < extra else 0))
