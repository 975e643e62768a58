"""Shared training core: one loop (DDP/FSDP, exact resume) used by the LM, SAM and other trainers."""
from linmix.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from linmix.training.distributed import (
    DistributedContext,
    all_reduce_sum,
    cleanup_distributed,
    setup_distributed,
    wrap_model,
)
from linmix.training.metrics import MetricsLog, read_metrics
from linmix.training.optim import build_adamw, parameter_groups, warmup_cosine_lambda, warmup_cosine_multiplier
from linmix.training.trainer import BatchSource, TrainConfig, Trainer, move_to_device, resolve_autocast

__all__ = [
    "BatchSource", "DistributedContext", "MetricsLog", "TrainConfig", "Trainer", "all_reduce_sum",
    "build_adamw", "cleanup_distributed", "latest_checkpoint", "load_checkpoint", "move_to_device",
    "parameter_groups", "read_metrics", "resolve_autocast", "save_checkpoint", "setup_distributed",
    "warmup_cosine_lambda", "warmup_cosine_multiplier", "wrap_model",
]
