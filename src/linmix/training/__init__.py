"""Shared training core: one loop (DDP/FSDP, exact resume) used by the LM, SAM and other trainers."""
from linmix.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from linmix.training.config import Recipe, read_toml, section_from_mapping, to_toml
from linmix.training.distributed import (
    DistributedContext,
    all_reduce_sum,
    cleanup_distributed,
    setup_distributed,
    wrap_model,
)
from linmix.training.metrics import MetricsLog, read_metrics
from linmix.training.optim import build_adamw, parameter_groups, warmup_cosine_lambda, warmup_cosine_multiplier
from linmix.training.trainer import (
    RESUMABLE_TRAIN_KEYS,
    BatchSource,
    TrainConfig,
    Trainer,
    check_resume_settings,
    move_to_device,
    resolve_autocast,
)

__all__ = [
    "BatchSource", "DistributedContext", "MetricsLog", "RESUMABLE_TRAIN_KEYS", "Recipe", "TrainConfig", "Trainer",
    "all_reduce_sum", "build_adamw", "check_resume_settings", "cleanup_distributed", "latest_checkpoint",
    "load_checkpoint", "move_to_device", "parameter_groups", "read_metrics", "read_toml", "resolve_autocast",
    "save_checkpoint", "section_from_mapping", "setup_distributed", "to_toml", "warmup_cosine_lambda",
    "warmup_cosine_multiplier", "wrap_model",
]
