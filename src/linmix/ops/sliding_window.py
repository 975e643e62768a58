"""Causal sliding-window softmax attention.

Layout: ``q, k, v: [B, T, H, D]`` (batch, time, heads, head dim); outputs have the same layout.

Query ``i`` attends to the keys ``j`` with ``i - window <= j <= i`` (itself plus the ``window``
previous keys) whose ``key_padding_mask[b, j]`` is True. A query that sees no key at all (e.g. a
left-padding position) returns zeros, never NaN. The softmax scale defaults to ``D ** -0.5``.
Half-precision inputs are computed (accumulated, on GPU) in fp32 and cast back.

Three forms:

- :func:`sliding_window_attention_reference`: the plain ``T x T`` masked softmax (test oracle).
- :func:`sliding_window_attention`: the fast path for training and prefill. Queries are cut into
  blocks of ``C`` tokens; block ``n`` attends only to its key band (the ``window`` keys before the
  block and the block itself), so memory and work are ``O(T * (C + window))``, never ``T x T``.
  It can continue from a :class:`SlidingWindowCache` and return the updated one.
- :func:`sliding_window_attention_step`: one decode token against the cache's ring buffer,
  updated in place (no allocation that grows with the tokens seen).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from linmix.ops import dispatch
from linmix.ops.state import MixerState
from linmix.ops._checks import accumulation_dtype, require_positive_int, require_same, require_shape

__all__ = [
    "SlidingWindowCache",
    "sliding_window_attention",
    "sliding_window_attention_reference",
    "sliding_window_attention_step",
]

_LAYOUT = "[B, T, H, D]"
_STEP_LAYOUT = "[B, H, D]"
# Query block of the fast path, clamped to [16, 64]: per query the work is (block + window) keys
# and the key bands are copied (block + window) / block times, so small blocks win until the
# per-block overhead dominates (measured on CPU at T=4096, H=16, D=64, windows 8..512).
_MIN_BLOCK = 16
_MAX_BLOCK = 64


@dataclasses.dataclass
class SlidingWindowCache(MixerState):
    """Decode state of sliding-window attention: a ring buffer of the last ``window`` keys/values.

    - ``k, v: [B, window, H, D]``: the key/value of absolute position ``p`` lives in slot
      ``p % window``; before a step at position ``seen`` the buffer holds positions
      ``seen - window .. seen - 1`` (the current key is attended directly, so ``window`` slots suffice
      for "itself plus ``window`` previous keys").
    - ``valid: [B, window]`` bool: False for slots never written or written by padding tokens.
    - ``seen``: tokens processed so far (padding included; it is also the next absolute position).

    Memory is fixed by ``window``; it does not grow with ``seen``.
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    seen: int = 0

    @classmethod
    def empty(cls, batch: int, window: int, heads: int, head_dim: int, device=None, dtype=torch.float32) -> "SlidingWindowCache":
        for name, value in (("batch", batch), ("window", window), ("heads", heads), ("head_dim", head_dim)):
            require_positive_int(name, value)
        k = torch.zeros(batch, window, heads, head_dim, device=device, dtype=dtype)
        return cls(k=k, v=torch.zeros_like(k), valid=torch.zeros(batch, window, device=device, dtype=torch.bool), seen=0)

    @property
    def window(self) -> int:
        return self.k.shape[1]

    def chronological(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffer oldest first: ``(k, v)`` as ``[B, window, H, D]`` and ``valid`` as ``[B, window]``,
        holding positions ``seen - window .. seen - 1``."""
        order = (self.seen + torch.arange(self.window, device=self.k.device)) % self.window
        return self.k[:, order], self.v[:, order], self.valid[:, order]


# ----------------------------------------------------------------------------------------------
# validation


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, key_padding_mask: torch.Tensor | None) -> None:
    require_shape("q", q, _LAYOUT, 4)
    require_shape("k", k, _LAYOUT, 4)
    require_shape("v", v, _LAYOUT, 4)
    require_same("q, k, v", _LAYOUT, q.shape, k.shape, v.shape)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    require_positive_int("window", window)
    if key_padding_mask is not None:
        batch, length = q.shape[:2]
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
            raise ValueError(f"key_padding_mask must be a bool tensor of shape [B, T] = {(batch, length)} (True = real token), got {got}")
        if tuple(key_padding_mask.shape) != (batch, length):
            raise ValueError(f"key_padding_mask must have shape [B, T] = {(batch, length)}, got {tuple(key_padding_mask.shape)}")


def _check_cache(cache: SlidingWindowCache, batch: int, heads: int, head_dim: int, window: int | None) -> None:
    if not isinstance(cache, SlidingWindowCache):
        raise ValueError(f"cache must be a SlidingWindowCache, got {type(cache).__name__}")
    if cache.k.dim() != 4 or tuple(cache.k.shape) != tuple(cache.v.shape) or tuple(cache.valid.shape) != tuple(cache.k.shape[:2]):
        raise ValueError(
            f"cache must hold k, v [B, window, H, D] and valid [B, window], got {tuple(cache.k.shape)}, "
            f"{tuple(cache.v.shape)}, {tuple(cache.valid.shape)}"
        )
    expected = (batch, cache.window if window is None else window, heads, head_dim)
    if tuple(cache.k.shape) != expected:
        raise ValueError(f"cache k, v must have shape [B, window, H, D] = {expected}, got {tuple(cache.k.shape)}")


def _scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


# ----------------------------------------------------------------------------------------------
# reference


def sliding_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Sliding-window attention as a plain ``T x T`` masked softmax (the oracle; O(T^2) memory).

    q, k, v: ``[B, T, H, D]``; key_padding_mask: ``[B, T]`` bool, True = real token.
    Returns ``[B, T, H, D]`` in q's dtype.
    """
    _check_qkv(q, k, v, window, key_padding_mask)
    scale = _scale(scale, q.shape[-1])
    compute = accumulation_dtype(q.dtype)
    length = q.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q.to(compute), k.to(compute)) * scale
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    allowed = ((j <= i) & (j >= i - window))[None, None]  # [1, 1, T, T]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row with no visible key would be softmax(all -inf) = NaN; give it zero weights instead.
    any_visible = allowed.any(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~any_visible, 0.0), dim=-1) * any_visible
    return torch.einsum("bhij,bjhd->bihd", weights, v.to(compute)).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# fast path


def _block_size(window: int, length: int) -> int:
    return min(max(window, _MIN_BLOCK), _MAX_BLOCK, length)


def _banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor,
    window: int,
    scale: float,
    block: int,
    rows_may_be_empty: bool,
) -> torch.Tensor:
    """Core of the fast path.

    q: [B, T, H, D]; k, v: [B, window + T, H, D] where the first ``window`` keys are the context
    before the chunk (cached keys, or padding); key_valid: [B or 1, window + T] bool.
    Query t sees keys t .. t + window of k (itself, at window + t, and the window keys before it).
    rows_may_be_empty: some query may see no valid key (only possible with padded keys).
    Each block of queries becomes one batch entry of a single scaled_dot_product_attention call
    over its key band, with a [block, block + window] mask. Returns [B, T, H, D].
    """
    batch, length, heads, head_dim = q.shape
    blocks = -(-length // block)
    padded = blocks * block
    extra = padded - length
    if extra:
        # Trailing queries/keys beyond T only ever see each other; they are cut off at the end.
        q = F.pad(q, (0, 0, 0, 0, 0, extra))
        k = F.pad(k, (0, 0, 0, 0, 0, extra))
        v = F.pad(v, (0, 0, 0, 0, 0, extra))
        key_valid = F.pad(key_valid, (0, extra), value=True)
    band = block + window
    # [B, T, H, D] -> [B * blocks, H, block, D]
    q_blocks = q.view(batch, blocks, block, heads, head_dim).transpose(2, 3).reshape(batch * blocks, heads, block, head_dim)
    # Key band of block n = keys n*block .. n*block + band - 1: unfold gives overlapping views
    # [B, blocks, H, D, band]; the reshape copies them once into [B * blocks, H, band, D].
    k_band = k.unfold(1, band, block).transpose(-1, -2).reshape(batch * blocks, heads, band, head_dim)
    v_band = v.unfold(1, band, block).transpose(-1, -2).reshape(batch * blocks, heads, band, head_dim)

    # Query a of a block sees band keys a .. a + window (the same pattern in every block).
    query_index = torch.arange(block, device=q.device)[:, None]
    key_index = torch.arange(band, device=q.device)[None, :]
    allowed = (key_index >= query_index) & (key_index <= query_index + window)  # [block, band]
    allowed = allowed & key_valid.unfold(1, band, block)[:, :, None, :]  # [B|1, blocks, block, band]
    any_visible = None
    if rows_may_be_empty:
        # softmax over an all-masked row is NaN: let such a row see its own key, zero it below.
        any_visible = allowed.any(dim=-1, keepdim=True)
        allowed = allowed | (~any_visible & (key_index == query_index + window))
    mask = allowed.expand(batch, blocks, block, band).reshape(batch * blocks, 1, block, band)

    out = F.scaled_dot_product_attention(q_blocks, k_band, v_band, attn_mask=mask, scale=scale)
    out = out.view(batch, blocks, heads, block, head_dim).transpose(2, 3).reshape(batch, padded, heads, head_dim)
    if any_visible is not None:
        out = out * any_visible.expand(batch, blocks, block, 1).reshape(batch, padded, 1, 1).to(out.dtype)
    return out[:, :length]


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    cache: SlidingWindowCache | None = None,
    return_cache: bool = False,
    block_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, SlidingWindowCache]:
    """Blocked sliding-window attention: equal to the reference, in ``O(T * window)`` memory.

    q, k, v: ``[B, T, H, D]``; key_padding_mask: ``[B, T]`` bool, True = real token.
    cache: keys/values that precede this chunk (continue a sequence); the chunk's positions are
    ``cache.seen .. cache.seen + T - 1``. The given cache is not modified.
    return_cache: also return the cache after this chunk, ``(out, new_cache)``; with no input cache a
    fresh one (``window`` slots, dtype of k) is built.
    block_size: queries per block (default ``window`` clamped to [16, 64]); only speed depends on it.
    backend: "auto" (FlexAttention with a block-sparse band mask for CUDA tensors, see
    :mod:`linmix.ops.flex_sliding_window`), "torch" (the blocked SDPA form) or "flex".
    Returns ``[B, T, H, D]`` in q's dtype, or ``(out, cache)``.
    """
    _check_qkv(q, k, v, window, key_padding_mask)
    dispatch.check_backend(backend, ("auto", "torch", "flex"))
    batch, length, heads, head_dim = q.shape
    if cache is not None:
        _check_cache(cache, batch, heads, head_dim, window)
    if block_size is not None:
        require_positive_int("block_size", block_size)
    scale = _scale(scale, head_dim)
    # The fused GPU kernels accumulate half inputs in fp32 themselves; the CPU path upcasts.
    compute = q.dtype if q.is_cuda else accumulation_dtype(q.dtype)

    if length == 0:
        out = q.new_zeros(q.shape)
        return (out, cache.clone() if cache is not None else SlidingWindowCache.empty(batch, window, heads, head_dim, q.device, k.dtype)) if return_cache else out

    # Left context: the cached keys (oldest first), or padding. Without a cache only
    # min(window, T - 1) previous keys can ever be seen, so the band is narrowed to that.
    if cache is not None:
        context_k, context_v, context_valid = cache.chronological()
        context_k, context_v = context_k.to(q.dtype), context_v.to(q.dtype)
        band_window = window
    else:
        band_window = min(window, length - 1)
        context_k = q.new_zeros(batch, band_window, heads, head_dim)
        context_v = context_k
        context_valid = torch.zeros(batch, band_window, dtype=torch.bool, device=q.device)
    keys = torch.cat([context_k, k], dim=1)
    values = torch.cat([context_v, v], dim=1)
    if key_padding_mask is not None:
        keys_valid = torch.cat([context_valid, key_padding_mask], dim=1)  # [B, window + T]
    elif cache is not None:
        keys_valid = torch.cat([context_valid, context_valid.new_ones(batch, length)], dim=1)
    else:
        # One row shared by the batch: only the (padding) context is invalid.
        keys_valid = (torch.arange(band_window + length, device=q.device) >= band_window)[None]

    block = block_size if block_size is not None else _block_size(band_window, length)
    if _use_flex(backend, q):
        from linmix.ops.flex_sliding_window import flex_banded_attention

        out = flex_banded_attention(q, keys.to(q.dtype), values.to(q.dtype), keys_valid, band_window, scale)
    else:
        # Without padded keys every query sees at least itself.
        out = _banded_attention(
            q.to(compute), keys.to(compute), values.to(compute), keys_valid, band_window, scale, block, key_padding_mask is not None
        ).to(q.dtype)
    if not return_cache:
        return out
    keys_valid = keys_valid.expand(batch, -1)
    return out, _cache_after(keys, values, keys_valid, (cache.seen if cache is not None else 0) + length, window, k.dtype)


def _use_flex(backend: str, q: torch.Tensor) -> bool:
    """FlexAttention for CUDA inputs under "auto" (and the torch path when forced, see linmix.ops.dispatch)."""
    if backend == "flex":
        return True
    return backend == "auto" and q.is_cuda and not dispatch.reference_forced() and dispatch.flex_attention_installed()


def _cache_after(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, seen: int, window: int, dtype: torch.dtype) -> SlidingWindowCache:
    """Ring buffer holding the last ``window`` of ``keys`` [B, L, H, D] (which end at position seen - 1)."""
    available = keys.shape[1]
    if available < window:
        short = window - available
        keys = F.pad(keys, (0, 0, 0, 0, short, 0))
        values = F.pad(values, (0, 0, 0, 0, short, 0))
        valid = F.pad(valid, (short, 0), value=False)
    first_position = seen - window
    # Slot of position p is p % window: rotate the chronological list so that holds.
    shift = first_position % window
    k_ring = torch.roll(keys[:, -window:], shifts=shift, dims=1).to(dtype)
    v_ring = torch.roll(values[:, -window:], shifts=shift, dims=1).to(dtype)
    valid_ring = torch.roll(valid[:, -window:], shifts=shift, dims=1)
    return SlidingWindowCache(k=k_ring.contiguous(), v=v_ring.contiguous(), valid=valid_ring.contiguous(), seen=seen)


# ----------------------------------------------------------------------------------------------
# decode step


def sliding_window_attention_step(
    cache: SlidingWindowCache,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    *,
    scale: float | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SlidingWindowCache]:
    """One token at position ``cache.seen``: attend to itself plus the cached ``window`` keys.

    q_t, k_t, v_t: ``[B, H, D]``; token_mask: optional ``[B]`` bool (False = this token is padding:
    it is not attended and its slot is marked invalid). The cache is updated in place (k_t, v_t
    overwrite the slot of position ``seen - window``) and returned. Returns ``(y_t [B, H, D], cache)``.
    """
    for name, tensor in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        require_shape(name, tensor, _STEP_LAYOUT, 3)
    require_same("q_t, k_t, v_t", _STEP_LAYOUT, q_t.shape, k_t.shape, v_t.shape)
    batch, heads, head_dim = q_t.shape
    _check_cache(cache, batch, heads, head_dim, None)
    if token_mask is not None and (not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool or tuple(token_mask.shape) != (batch,)):
        got = tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
        raise ValueError(f"token_mask must be a bool tensor of shape [B] = ({batch},), got {got}")
    scale = _scale(scale, head_dim)
    compute = accumulation_dtype(q_t.dtype)

    q = q_t.to(compute)
    cached_scores = torch.einsum("bhd,bwhd->bhw", q, cache.k.to(compute)) * scale  # [B, H, window]
    cached_scores = cached_scores.masked_fill(~cache.valid[:, None, :], float("-inf"))
    own_score = (q * k_t.to(compute)).sum(-1, keepdim=True) * scale  # [B, H, 1]
    own_valid = torch.ones(batch, 1, 1, dtype=torch.bool, device=q.device) if token_mask is None else token_mask[:, None, None]
    own_score = own_score.masked_fill(~own_valid, float("-inf"))

    scores = torch.cat([cached_scores, own_score], dim=-1)  # [B, H, window + 1]
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(scores - peak)  # exp(-inf) = 0 for invalid slots
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    y = torch.einsum("bhw,bwhd->bhd", weights[..., :-1], cache.v.to(compute)) + weights[..., -1:] * v_t.to(compute)

    slot = cache.seen % cache.window
    cache.k[:, slot] = k_t.to(cache.k.dtype)
    cache.v[:, slot] = v_t.to(cache.v.dtype)
    if token_mask is None:
        cache.valid[:, slot] = True
    else:
        cache.valid[:, slot] = token_mask
    cache.seen += 1
    return y.to(q_t.dtype), cache
