"""torchrun integration: process group set-up, model wrapping (DDP or FSDP2), metric reduction.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; without it everything
runs as a single process and these helpers are no-ops. CPU runs use the gloo backend, CUDA nccl.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | torch.device | None = None) -> DistributedContext:
    """Join the torchrun process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if device is None:
        resolved = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    else:
        resolved = torch.device(device)
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistributedContext, strategy: str = "ddp") -> nn.Module:
    """DDP or FSDP2 (``fully_shard``) around ``model``; the model itself for one process.

    With FSDP every rank must build the model with the same initial weights (same seed): unlike DDP,
    ``fully_shard`` does not broadcast rank 0's parameters.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not context.is_distributed:
        return model
    if strategy == "ddp":
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)  # in place: parameters become sharded DTensors
    return model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-steps that only accumulate."""
    if enabled:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)  # FSDP2 module
    if setter is None:
        with nullcontext():
            yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def all_reduce_sum(values: dict[str, float], context: DistributedContext) -> dict[str, float]:
    """Sum each value over all ranks (identity for one process). Keys must match on all ranks."""
    if not context.is_distributed or not values:
        return dict(values)
    keys = sorted(values)
    device = context.device if context.device.type == "cuda" else torch.device("cpu")
    packed = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.tolist()))


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()
