"""The contract every causal token mixer in linmix follows.

A causal mixer maps ``x: [B, T, d_model] -> y: [B, T, d_model]`` and can also run as a recurrence:

- ``forward(x, state=None, *, attention_mask=None, return_state=False)``: the whole sequence at
  once (the fast parallel/chunked path). With ``state`` it continues from that state (prefix, then
  this chunk); with ``return_state=True`` it returns ``(y, final_state)``.
  ``attention_mask: [B, T]`` (bool or 0/1; True/1 = real token) supports left-padded batches:
  padded positions never enter any state (sums, conv history, window, KV cache); their outputs are
  unspecified but finite.
- ``step(x_t, state) -> (y_t, state)`` with ``x_t: [B, d_model]``: one token. States may be updated
  in place for speed (decode must not allocate per token); always use the returned state and call
  ``state.clone()`` to keep a copy.
- ``init_state(batch_size, *, device=None, dtype=None)``: the empty state (dtype is the activation
  dtype; accumulators that need it stay fp32).
- ``state_size_bytes(seq_len)``: the recurrent state of one sequence in bytes at fp32, following
  the BASED paper's accounting (attention 2*d*L, sliding window 2*d*w, Taylor linear attention
  h*head_dim*D' + h*D', Mamba 2*d*d_state, short conv d*k), 4 bytes a number.
"""

from __future__ import annotations

import torch
from torch import nn

from linmix.ops.state import MixerState  # noqa: F401  (re-exported: part of the mixer contract)


def normalize_attention_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor | None:
    """Validate an attention mask [B, T] and return it as bool (True = real token), or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have shape [B, T] = {(batch, length)}, got {shape}")
    return attention_mask.to(device=device, dtype=torch.bool)


def check_sequence_input(x: torch.Tensor, d_model: int) -> None:
    """x must be a floating [B, T, d_model] tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of shape [B, T, {d_model}], got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [B, T, {d_model}], got {tuple(x.shape)}")


def check_step_input(x_t: torch.Tensor, d_model: int) -> None:
    """x_t must be a floating [B, d_model] tensor (one token)."""
    if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
        raise ValueError(f"x_t must be a floating-point tensor of shape [B, {d_model}], got {getattr(x_t, 'dtype', type(x_t).__name__)}")
    if x_t.dim() != 2 or x_t.shape[-1] != d_model:
        raise ValueError(f"x_t must have shape [B, {d_model}] (one token), got {tuple(x_t.shape)}")


class CausalMixer(nn.Module):
    """Base class documenting the mixer contract (see the module docstring)."""

    d_model: int

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> MixerState:  # pragma: no cover
        raise NotImplementedError

    def step(self, x_t: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:  # pragma: no cover
        raise NotImplementedError

    def state_size_bytes(self, seq_len: int) -> int:  # pragma: no cover
        raise NotImplementedError
