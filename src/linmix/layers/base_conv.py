"""BaseConv, BASED's default layer: a gated short causal convolution.

``u1, u2 = in_proj(x).split(2d)``; ``y = out_proj(silu(short_conv(u1)) * u2)``. Parameter names follow
the official checkpoints (``in_proj``, ``out_proj``, ``conv.conv.weight`` of shape [2d, 1, K]).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from linmix.layers.base import CausalMixer, check_sequence_input, check_step_input, normalize_attention_mask
from linmix.ops.short_conv import ShortConvState, short_conv, short_conv_step


class ShortConvolution(nn.Module):
    """Depthwise causal conv holding an ``nn.Conv1d`` named ``conv`` (the official key layout)."""

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight[:, 0]  # [C, K]

    def forward(self, x: torch.Tensor, state: ShortConvState | None = None, return_state: bool = False):
        return short_conv(x, self.weight, self.conv.bias, initial_state=state, return_final_state=return_state)

    def step(self, x_t: torch.Tensor, state: ShortConvState):
        return short_conv_step(state, x_t, self.weight, self.conv.bias)


@dataclasses.dataclass
class BaseConvState(ShortConvState):
    """Conv history of the gated branch: [B, 2d, K - 1]."""


class BaseConv(CausalMixer):
    """x [B, T, d] -> [B, T, d]. State: the last K - 1 inputs of the conv (constant size)."""

    def __init__(self, d_model: int, kernel_size: int = 3, expand: int = 2, bias: bool = True, conv_bias: bool = False):
        super().__init__()
        self.d_model = d_model
        self.inner = expand * d_model
        self.kernel_size = kernel_size
        self.in_proj = nn.Linear(d_model, 2 * self.inner, bias=bias)
        self.conv = ShortConvolution(self.inner, kernel_size, bias=conv_bias)
        self.out_proj = nn.Linear(self.inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor, state: BaseConvState | None = None, *, attention_mask=None, return_state: bool = False):
        check_sequence_input(x, self.d_model)
        mask = normalize_attention_mask(attention_mask, x.shape[0], x.shape[1], x.device)
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        if mask is not None:  # padded tokens must not enter the conv history
            u1 = u1 * mask.unsqueeze(-1).to(u1.dtype)
        conv_state = None if state is None else ShortConvState(history=state.history)
        result = self.conv(u1, conv_state, return_state=return_state)
        u, new_state = result if return_state else (result, None)
        y = self.out_proj(F.silu(u) * u2)
        if not return_state:
            return y
        return y, BaseConvState(history=new_state.history)

    def step(self, x_t: torch.Tensor, state: BaseConvState):
        check_step_input(x_t, self.d_model)
        u1, u2 = self.in_proj(x_t).chunk(2, dim=-1)
        u, _ = self.conv.step(u1, state)
        return self.out_proj(F.silu(u) * u2), state

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> BaseConvState:
        weight = self.in_proj.weight
        return BaseConvState.empty(batch_size, self.inner, self.kernel_size,
                                   device=device or weight.device, dtype=dtype or weight.dtype)

    def state_size_bytes(self, seq_len: int) -> int:
        """Short conv: channels * kernel numbers (the paper's d*k), 4 bytes each."""
        return 4 * self.inner * self.kernel_size
