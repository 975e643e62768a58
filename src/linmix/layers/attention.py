"""Softmax attention mixers: sliding-window (BASED) and global causal multi-head attention.

Both follow the causal-mixer contract of :mod:`linmix.layers.base` and share the parameter names of
the official BASED checkpoints: ``Wqkv: d -> 3d`` packed as ``[Q | K | V]`` (heads contiguous within
each third) and ``out_proj: d -> d``. Rotary embeddings (rotate-half, see :mod:`linmix.ops.rotary`)
act on q and k at absolute positions ``0, 1, ...`` of the (possibly left-padded) sequence, continued
by the state in decode; with left padding only relative distances matter, so padding shifts nothing.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from linmix.layers.base import CausalMixer, MixerState, check_sequence_input, check_step_input, normalize_attention_mask
from linmix.ops._checks import accumulation_dtype, require_positive_int
from linmix.ops.rotary import apply_rotary, rotary_cos_sin, rotary_dim_for
from linmix.ops.sliding_window import SlidingWindowCache, sliding_window_attention, sliding_window_attention_step

__all__ = ["KVCache", "MultiHeadAttention", "SlidingWindowAttention"]


class _RotaryQKVAttention(CausalMixer):
    """Shared projections: packed Wqkv, out_proj, rotary on the first rotary_dim channels of q, k."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rotary_fraction: float,
        rotary_base: float,
        qkv_bias: bool,
        out_bias: bool,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        require_positive_int("d_model", d_model)
        require_positive_int("num_heads", num_heads)
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.rotary_dim = rotary_dim_for(self.head_dim, rotary_fraction)
        self.rotary_base = float(rotary_base)
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=out_bias, device=device, dtype=dtype)

    def _qkv(self, x: torch.Tensor, first_position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, d_model] at positions first_position.. -> q, k, v: [B, T, H, head_dim]."""
        batch, length, _ = x.shape
        q, k, v = self.Wqkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(dim=2)
        if self.rotary_dim:
            positions = torch.arange(first_position, first_position + length, device=x.device)
            cos, sin = rotary_cos_sin(positions, self.rotary_dim, self.rotary_base)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def _default_device_dtype(self, device, dtype) -> tuple[torch.device, torch.dtype]:
        weight = self.Wqkv.weight
        return (weight.device if device is None else torch.device(device)), (weight.dtype if dtype is None else dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, rotary_dim={self.rotary_dim}"


class SlidingWindowAttention(_RotaryQKVAttention):
    """Causal sliding-window softmax attention (the BASED "alt_mixer_2").

    Each token attends to itself and the ``window`` previous tokens. The BASED config
    ``window_size: 256`` corresponds to ``window=128`` here (``window_size / 2``).
    State: a :class:`~linmix.ops.sliding_window.SlidingWindowCache` (ring buffer of ``window`` keys
    and values, fixed size); its ``seen`` count is also the next rotary position.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 16,
        window: int = 128,
        rotary_fraction: float = 1.0,
        rotary_base: float = 10000.0,
        qkv_bias: bool = False,
        out_bias: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, num_heads, rotary_fraction, rotary_base, qkv_bias, out_bias, device, dtype)
        require_positive_int("window", window)
        self.window = window

    def forward(
        self,
        x: torch.Tensor,
        state: SlidingWindowCache | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, SlidingWindowCache]:
        """x: [B, T, d_model] -> [B, T, d_model] (and the new state if return_state).

        The given state is not modified; the returned one is new.
        """
        check_sequence_input(x, self.d_model)
        batch, length, _ = x.shape
        mask = normalize_attention_mask(attention_mask, batch, length, x.device)
        if state is not None and not isinstance(state, SlidingWindowCache):
            raise ValueError(f"state must be a SlidingWindowCache (from init_state or forward), got {type(state).__name__}")
        q, k, v = self._qkv(x, state.seen if state is not None else 0)
        result = sliding_window_attention(q, k, v, window=self.window, key_padding_mask=mask, cache=state, return_cache=return_state)
        out, new_state = result if return_state else (result, None)
        y = self.out_proj(out.reshape(batch, length, self.d_model))
        return (y, new_state) if return_state else y

    def step(self, x_t: torch.Tensor, state: SlidingWindowCache) -> tuple[torch.Tensor, SlidingWindowCache]:
        """x_t: [B, d_model] -> y_t: [B, d_model]; the ring buffer is updated in place."""
        check_step_input(x_t, self.d_model)
        if not isinstance(state, SlidingWindowCache):
            raise ValueError(f"state must be a SlidingWindowCache (from init_state or forward), got {type(state).__name__}")
        q, k, v = self._qkv(x_t[:, None], state.seen)
        y, state = sliding_window_attention_step(state, q[:, 0], k[:, 0], v[:, 0])
        return self.out_proj(y.reshape(x_t.shape[0], self.d_model)), state

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> SlidingWindowCache:
        device, dtype = self._default_device_dtype(device, dtype)
        return SlidingWindowCache.empty(batch_size, self.window, self.num_heads, self.head_dim, device=device, dtype=dtype)

    def state_size_bytes(self, seq_len: int) -> int:
        """4 * 2 * d_model * window (keys and values of the window), whatever seq_len."""
        return 4 * 2 * self.d_model * self.window

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"


@dataclasses.dataclass
class KVCache(MixerState):
    """Growing key/value cache of global attention.

    - ``k, v: [B, H, capacity, D]`` (heads first, so attention reads them as views without copies);
      only the first ``length`` positions are in use.
    - ``valid: [B, capacity]`` bool: False for padding tokens (and unused capacity).
    - ``length``: tokens written so far (padding included; also the next rotary position).
    - ``padded``: whether any written position is padding (if not, decoding needs no mask, which
      lets SDPA pick its flash kernel).

    Writes are in place; when full, capacity doubles (one copy), so generating N tokens costs
    O(N) copies in total rather than O(N^2).
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    length: int = 0
    padded: bool = False

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, capacity: int = 64, device=None, dtype=torch.float32) -> "KVCache":
        for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim), ("capacity", capacity)):
            require_positive_int(name, value)
        k = torch.zeros(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        return cls(k=k, v=torch.zeros_like(k), valid=torch.zeros(batch, capacity, device=device, dtype=torch.bool), length=0)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions in total, doubling the capacity as often as required."""
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        batch, heads, _, head_dim = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(batch, heads, capacity, head_dim)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        valid = self.valid.new_zeros(batch, capacity)
        valid[:, : self.length] = self.valid[:, : self.length]
        self.valid = valid

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Write k, v: [B, H, T, D] (valid: [B, T] bool or None = all real) after the used positions."""
        length = k.shape[2]
        self.reserve(self.length + length)
        end = self.length + length
        self.k[:, :, self.length : end] = k.to(self.k.dtype)
        self.v[:, :, self.length : end] = v.to(self.v.dtype)
        self.valid[:, self.length : end] = True if valid is None else valid
        if valid is not None and not self.padded:
            self.padded = not bool(valid.all())
        self.length = end


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """SDPA on [B, H, T|S, D] with a bool mask [B, 1, T, S]; rows that see no key return zeros."""
    any_visible = allowed.any(dim=-1, keepdim=True)  # [B, 1, T, 1]
    # softmax over an all-masked row is NaN: let such a row see every key, then zero it.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~any_visible)
    return out * any_visible.to(out.dtype)


class MultiHeadAttention(_RotaryQKVAttention):
    """Global causal softmax attention (the BASED paper's attention baseline), with a KV cache.

    State: a :class:`KVCache` with preallocated capacity, doubled when full.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rotary_fraction: float = 1.0,
        rotary_base: float = 10000.0,
        qkv_bias: bool = False,
        out_bias: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, num_heads, rotary_fraction, rotary_base, qkv_bias, out_bias, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        state: KVCache | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """x: [B, T, d_model] -> [B, T, d_model] (and the cache if return_state).

        With ``state``, the chunk attends to the cached tokens and itself. With ``return_state`` the
        given cache is extended in place and returned; without, it is left untouched.
        """
        check_sequence_input(x, self.d_model)
        batch, length, _ = x.shape
        mask = normalize_attention_mask(attention_mask, batch, length, x.device)
        if state is not None:
            self._check_state(state, batch)
        past = state.length if state is not None else 0
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, past))  # [B, H, T, D]
        # The fused GPU kernels accumulate half inputs in fp32; on CPU compute in fp32.
        compute = q.dtype if q.is_cuda else accumulation_dtype(q.dtype)

        if return_state:
            if state is None:
                capacity = 1 << max(length - 1, 1).bit_length()  # next power of two >= T, at least 2
                device, dtype = x.device, k.dtype
                state = KVCache.empty(batch, self.num_heads, self.head_dim, capacity=capacity, device=device, dtype=dtype)
            state.append(k, v, mask)

        if past == 0 and mask is None:  # no earlier tokens, no padding: plain causal (flash) SDPA
            out = F.scaled_dot_product_attention(q.to(compute), k.to(compute), v.to(compute), is_causal=True)
        else:
            if state is None:
                keys, values = k, v
                keys_valid = mask
            elif return_state:  # the chunk is already in the cache
                keys, values = state.k[:, :, : state.length], state.v[:, :, : state.length]
                keys_valid = state.valid[:, : state.length]
            else:
                keys = torch.cat([state.k[:, :, :past].to(k.dtype), k], dim=2)
                values = torch.cat([state.v[:, :, :past].to(v.dtype), v], dim=2)
                chunk_valid = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
                keys_valid = torch.cat([state.valid[:, :past], chunk_valid], dim=1)
            total = keys.shape[2]
            query_position = past + torch.arange(length, device=x.device)[:, None]
            causal = torch.arange(total, device=x.device)[None, :] <= query_position  # [T, S]
            allowed = causal[None, None] & keys_valid[:, None, None, :]
            out = _masked_attention(q.to(compute), keys.to(compute), values.to(compute), allowed)
        y = self.out_proj(out.to(x.dtype).transpose(1, 2).reshape(batch, length, self.d_model))
        return (y, state) if return_state else y

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """x_t: [B, d_model] -> y_t: [B, d_model]; the cache is written in place (grown if full)."""
        check_step_input(x_t, self.d_model)
        batch = x_t.shape[0]
        self._check_state(state, batch)
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x_t[:, None], state.length))  # [B, H, 1, D]
        state.append(k, v, None)
        compute = q.dtype if q.is_cuda else accumulation_dtype(q.dtype)
        used = state.length
        # The current token is always valid; without padding in the cache no mask is needed at all.
        allowed = state.valid[:, None, None, :used] if state.padded else None
        out = F.scaled_dot_product_attention(
            q.to(compute), state.k[:, :, :used].to(compute), state.v[:, :, :used].to(compute), attn_mask=allowed
        )
        return self.out_proj(out.to(x_t.dtype).reshape(batch, self.d_model)), state

    def init_state(self, batch_size: int, *, device=None, dtype=None, capacity: int = 64) -> KVCache:
        device, dtype = self._default_device_dtype(device, dtype)
        return KVCache.empty(batch_size, self.num_heads, self.head_dim, capacity=capacity, device=device, dtype=dtype)

    def state_size_bytes(self, seq_len: int) -> int:
        """4 * 2 * d_model * seq_len (all keys and values, the paper's accounting)."""
        return 4 * 2 * self.d_model * seq_len

    def _check_state(self, state: KVCache, batch: int) -> None:
        if not isinstance(state, KVCache):
            raise ValueError(f"state must be a KVCache (from init_state or forward), got {type(state).__name__}")
        expected = (batch, self.num_heads, self.head_dim)
        got = (state.k.shape[0], state.k.shape[1], state.k.shape[3])
        if state.k.dim() != 4 or got != expected:
            raise ValueError(f"state k, v must have shape [B, H, capacity, D] with (B, H, D) = {expected}, got {tuple(state.k.shape)}")
