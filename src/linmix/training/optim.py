"""AdamW with the usual no-decay rule, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

# Parameters that are not weight matrices of a projection: decaying them only hurts.
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _is_no_decay(module: nn.Module, name: str, parameter: nn.Parameter) -> bool:
    if parameter.ndim < 2:  # biases, norm scales, layer scales, per-channel decays
        return True
    if isinstance(module, _NO_DECAY_MODULES):
        return True
    lowered = name.lower()
    return "embed" in lowered or "norm" in lowered


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    No decay on biases, norms, embeddings (including positional embeddings) and any parameter with
    fewer than 2 dims. Frozen parameters (``requires_grad=False``) are left out; tied parameters
    appear once.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            (no_decay if _is_no_decay(module, name, parameter) else decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` of ``model``."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def warmup_cosine_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """The schedule as a function for ``torch.optim.lr_scheduler.LambdaLR``."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def multiplier(step: int) -> float:
        return warmup_cosine_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    return multiplier
