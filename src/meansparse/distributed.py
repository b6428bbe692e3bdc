"""torch.distributed helpers: rank and world size, deterministic sharding, gathering, torchrun setup.

Everything degrades to the single-process behaviour when no process group is initialised, so library code
can call these helpers unconditionally.  Under ``torchrun`` :func:`launch` initialises the process group
(gloo on CPU, nccl on GPU, one device per local rank) and tears it down again.

Sharding is strided and unpadded (rank r takes examples r, r + W, r + 2W, ...): unlike
``DistributedSampler`` nothing is duplicated to equalise shard sizes, because a duplicated image would be
counted twice in the calibration statistics.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "is_initialized",
    "rank",
    "world_size",
    "is_main",
    "collective_device",
    "all_gather",
    "sum_over_ranks",
    "barrier",
    "shard_indices",
    "shard",
    "all_gather_object",
    "broadcast_object",
    "launch",
]


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (the default group when None); 1 without a process group."""
    import torch.distributed as dist

    return dist.get_world_size(group) if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and without a process group): the rank that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if is_initialized() and world_size() > 1:
        dist.barrier()


def collective_device(group: Any = None) -> torch.device:
    """Where the tensors of a collective over ``group`` live: the current CUDA device under nccl, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``t`` (the same shape and dtype on every rank) in rank order; ``[t]`` without a group."""
    import torch.distributed as dist

    w = world_size(group)
    if w == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(w)]
    dist.all_gather(out, t, group=group)
    return out


def sum_over_ranks(value: int) -> int:
    """``value`` summed over every rank (``value`` itself without a process group)."""
    import torch.distributed as dist

    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t)
    return int(t.item())


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """Indices of this rank's shard of ``range(n)``: ``rank, rank + world, ...`` (no padding, no overlap)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside a world of size {w}")
    return torch.arange(r, n, w)


def shard(data: Any, rank_: int | None = None, world: int | None = None) -> Any:
    """This rank's shard of an :class:`~meansparse.data.ImageSet` (the set itself when not distributed)."""
    w = world_size() if world is None else world
    if w == 1:
        return data
    idx = shard_indices(len(data), rank_, w)
    return data.subset(idx, f"{data.name}-shard{rank() if rank_ is None else rank_}of{w}")


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    import torch.distributed as dist

    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextmanager
def launch(device: str | None = None) -> Iterator[str]:
    """Initialise torch.distributed when started by ``torchrun`` (``WORLD_SIZE`` > 1) and yield the device
    this rank should use: ``device`` (default ``cuda`` if available, else ``cpu``), with ``cuda`` pinned to
    ``cuda:LOCAL_RANK``.  The process group is destroyed on exit if this call created it."""
    import torch.distributed as dist

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    created = False
    if _env_world() > 1 and not is_initialized():
        dev = torch.device(device)
        if dev.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if dev.index is None:
                device = f"cuda:{local}"
            torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        created = True
    elif is_initialized() and torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
    try:
        yield device
    finally:
        if created and is_initialized():
            dist.destroy_process_group()
