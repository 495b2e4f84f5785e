"""Several processes (torchrun): joining the process group and the few collective operations comeba uses."""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)


def dist_context() -> tuple[int, int] | None:
    """(rank, world size) inside an initialised torch.distributed group of more than one process, else None."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None


def init_distributed_from_env(device: str | torch.device | None = "auto") -> bool:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1, env://).

    Does nothing (returns False) without those variables, when torch.distributed
    is missing, or when a group is already initialised. With CUDA as the target
    `device`, each process takes the GPU of its LOCAL_RANK and the group is
    NCCL for CUDA tensors (gloo for CPU ones); on the CPU it is gloo. Returns
    True when it initialised the group (the caller then destroys it).
    """
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    from .models import resolve_device

    target = resolve_device(device or "auto")
    backend = "gloo"
    if target.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if target.index is None:
            if local >= torch.cuda.device_count():
                raise ValueError(f"process {local} of this node asks for a GPU, but only {torch.cuda.device_count()} "
                                 "CUDA device(s) exist: start fewer processes per node, or use --device cpu")
            torch.cuda.set_device(local)  # "cuda" (and "auto") now mean this process's GPU
        else:
            torch.cuda.set_device(target)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://")
    log.info("joined a %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return True


def leave_group(finished: bool) -> None:
    """Destroy the process group joined by `init_distributed_from_env`.

    After a clean finish the ranks first meet at a barrier: a rank that left while
    its last sends were still in flight has been seen to abort in gloo's threads
    ("terminate called without an active exception"). After a failure they do
    not wait for each other (the others may never arrive)."""
    dist = torch.distributed
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def comm_device(device: torch.device) -> torch.device:
    """Where a tensor must be for the group's backend: the CPU for gloo, this process's GPU for NCCL
    (a "cpu:gloo,cuda:nccl" group takes CPU tensors as they are)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" not in backend or (device.type == "cpu" and "gloo" in backend):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    dist = torch.distributed
    op = dist.ReduceOp.SUM if op is None else op
    where = comm_device(t.device)
    if t.device == where:
        dist.all_reduce(t, op=op)
        return t
    moved = t.to(where)
    dist.all_reduce(moved, op=op)
    return moved.to(t.device)


def broadcast_object(obj, rank: int):
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def is_lead() -> bool:
    """Whether this process speaks and writes for the group (rank 0, or the only process)."""
    ctx = dist_context()
    return ctx is None or ctx[0] == 0


def from_lead(obj):
    """Rank 0's `obj` on every process of the group (the object itself without a group)."""
    ctx = dist_context()
    return obj if ctx is None else broadcast_object(obj, ctx[0])


def gather_split(n: int, compute: Callable[[list[int]], list]) -> list:
    """`compute(indices)` (one result per index) over items 0..n-1, the items dealt round-robin to the processes
    of a group and the results gathered back in order on every process; `compute(range(n))` without a group."""
    ctx = dist_context()
    if ctx is None:
        return list(compute(list(range(n))))
    rank, world = ctx
    mine = list(range(rank, n, world))
    part = list(compute(mine)) if mine else []
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, part)
    out: list = [None] * n
    for r, results in enumerate(parts):
        for i, value in zip(range(r, n, world), results):
            out[i] = value
    return out
