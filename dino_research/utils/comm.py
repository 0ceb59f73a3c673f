"""Distributed helpers that also work with no process group (one process, CPU or GPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialized (and so collectives are required)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean of ``tensor`` over all ranks; a no-op on one process. Returns ``tensor``."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(get_world_size())
    return tensor


def synchronize() -> None:
    """Barrier across ranks; a no-op on one process."""
    if get_world_size() > 1:
        dist.barrier()
