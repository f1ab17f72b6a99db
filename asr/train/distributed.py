"""Data-parallel training across processes: set up from torchrun's environment, and small collectives.

Launch with torchrun; every process runs the same script, and this module reads RANK,
WORLD_SIZE and LOCAL_RANK from the environment that torchrun sets. Without them (a plain
`python` launch) everything here is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device: torch.device, timeout_minutes: float = 60.0) -> tuple[DistributedContext, torch.device]:
    """Join the process group that torchrun set up (NCCL on CUDA, gloo on CPU).

    Returns the context and this process's device: on CUDA, the GPU numbered LOCAL_RANK.
    A single process (no torchrun) gets a disabled context and `device` unchanged.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistributedContext(), device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # evaluation runs on rank 0 while the others wait: the timeout must outlast it
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank, world, local), device


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(ctx: DistributedContext, values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all processes (a copy; `values` itself is unchanged).

    CPU tensors are moved to the GPU only where the backend (NCCL) needs it; one process copies nothing
    across devices, so counting a batch on the CPU never waits for the GPU.
    """
    if not ctx.enabled:
        return values.clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    out = values.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(ctx: DistributedContext, obj: object) -> list:
    """Every process's `obj`, in rank order (picklable objects; used for RNG states only)."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistributedContext, obj: object) -> object:
    """Rank 0's `obj` on every process."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
