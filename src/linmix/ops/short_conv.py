"""Causal depthwise 1-D convolution ("short conv") with a recurrent step.

Layout: x [B, T, C] (channels last), weight [C, K], optional bias [C]:

    y[b, t, c] = bias[c] + sum_{j=0}^{K-1} weight[c, j] * x[b, t - (K - 1) + j, c]

with x taken as zero before the sequence (or from the state when continuing one). This is
``nn.Conv1d(C, C, K, groups=C, padding=K - 1)`` cropped to the first T outputs, i.e. the weight
layout of the official checkpoints (``[C, 1, K]`` there). The step state is the last K - 1 inputs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from linmix.ops._checks import require_same, require_shape
from linmix.ops.state import MixerState


@dataclasses.dataclass
class ShortConvState(MixerState):
    """The last K - 1 inputs per channel, oldest first: history [B, C, K - 1]."""

    history: torch.Tensor

    @classmethod
    def empty(cls, batch: int, channels: int, kernel_size: int, *, device=None, dtype=torch.float32):
        return cls(history=torch.zeros(batch, channels, kernel_size - 1, device=device, dtype=dtype))


def _check(x, weight, bias, x_layout):
    require_shape("weight", weight, "[C, K]", 2)
    channels = weight.shape[0]
    if x.dim() != len(x_layout.split(",")) or x.shape[-1] != channels:
        require_shape("x", x, x_layout, len(x_layout.split(",")))
        raise ValueError(f"x must have shape {x_layout} with C = {channels} (weight is [C, K]), got {tuple(x.shape)}")
    require_shape("x", x, x_layout, x.dim())
    if bias is not None:
        require_shape("bias", bias, "[C]", 1)
        require_same("bias, weight", "C", tuple(bias.shape), (channels,))


def short_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit sum over taps (the oracle). x [B, T, C] -> [B, T, C]."""
    _check(x, weight, bias, "[B, T, C]")
    kernel_size = weight.shape[1]
    padded = F.pad(x, (0, 0, kernel_size - 1, 0))
    length = x.shape[1]
    out = sum(padded[:, j : j + length] * weight[:, j] for j in range(kernel_size))
    return out + bias if bias is not None else out


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: ShortConvState | None = None,
    return_final_state: bool = False,
):
    """Causal depthwise conv via ``F.conv1d``. x [B, T, C] -> [B, T, C] (and the final state)."""
    _check(x, weight, bias, "[B, T, C]")
    batch, length, channels = x.shape
    kernel_size = weight.shape[1]
    channels_first = x.transpose(1, 2)  # [B, C, T]
    if initial_state is None:
        history = channels_first.new_zeros(batch, channels, kernel_size - 1)
    else:
        history = initial_state.history.to(x.dtype)
        if tuple(history.shape) != (batch, channels, kernel_size - 1):
            raise ValueError(f"state.history must have shape [B, C, K - 1] = {(batch, channels, kernel_size - 1)}, got {tuple(history.shape)}")
    extended = torch.cat([history, channels_first], dim=-1)
    y = F.conv1d(extended, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=channels)
    y = y.transpose(1, 2)
    if not return_final_state:
        return y
    return y, ShortConvState(history=extended[..., extended.shape[-1] - (kernel_size - 1) :].contiguous())


def short_conv_step(
    state: ShortConvState, x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, ShortConvState]:
    """One token: x_t [B, C] -> (y_t [B, C], state). The history is shifted in place."""
    _check(x_t, weight, bias, "[B, C]")
    kernel_size = weight.shape[1]
    history = state.history
    if tuple(history.shape) != (x_t.shape[0], x_t.shape[1], kernel_size - 1):
        raise ValueError(f"state.history must have shape [B, C, K - 1] = {(x_t.shape[0], x_t.shape[1], kernel_size - 1)}, got {tuple(history.shape)}")
    y = (history * weight[:, :-1]).sum(-1) + x_t * weight[:, -1]
    if bias is not None:
        y = y + bias
    if kernel_size > 1:
        history.copy_(torch.cat([history[..., 1:], x_t.unsqueeze(-1).to(history.dtype)], dim=-1))
    return y, state
