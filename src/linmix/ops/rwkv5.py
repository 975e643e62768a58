"""The RWKV-5 ("Eagle") recurrence: a matrix-valued state per head with per-channel decays.

Layout ``[B, T, H, K]`` (batch, time, heads, head dim) for ``r, k, log_decay``; ``v: [B, T, H, V]``;
``bonus: [H, K]``; the state ``S: [B, H, K, V]`` (key x value)::

    y_t = r_t (diag(u) k_t^T v_t + S_{t-1})              u = bonus
    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t

Decays are given per position (``log_decay <= 0``), so that a padded token can get decay 1 (log 0)
and no input (k = 0). Two forms:

- :func:`rwkv5_recurrence_reference`: token by token, the test oracle;
- :func:`rwkv5_recurrence`: chunked, for training and prefill: within a chunk of ``chunk_size``
  tokens a masked ``[C, C]`` attention-like product with per-channel decays, across chunks the
  state. Every exponent it forms is a sum of log decays, so <= 0: nothing overflows.

- :func:`rwkv5_recurrence_step`: one token (decoding), the reference's loop body.

All forms compute in the dtype of ``state`` (the layer keeps it in fp32 for
half-precision activations) and return ``y`` and the final state in that dtype. Validation reads
shapes only, never values, so both forms trace and compile without graph breaks.
"""

from __future__ import annotations

import torch

from linmix.ops._checks import require_positive_int, require_shape

__all__ = ["rwkv5_recurrence", "rwkv5_recurrence_reference", "rwkv5_recurrence_step"]

_LAYOUT = "[B, T, H, K]"


def _check_inputs(r, k, v, log_decay, bonus, state) -> None:
    for name, tensor in (("r", r), ("k", k), ("log_decay", log_decay)):
        require_shape(name, tensor, _LAYOUT, 4)
    require_shape("v", v, "[B, T, H, V]", 4)
    require_shape("bonus", bonus, "[H, K]", 2)
    require_shape("state", state, "[B, H, K, V]", 4)
    batch, length, heads, key_dim = r.shape
    if tuple(k.shape) != tuple(r.shape) or tuple(log_decay.shape) != tuple(r.shape):
        raise ValueError(f"r, k and log_decay must share the shape {_LAYOUT}, got r {tuple(r.shape)}, "
                         f"k {tuple(k.shape)}, log_decay {tuple(log_decay.shape)}")
    if tuple(v.shape[:3]) != (batch, length, heads):
        raise ValueError(f"v must have shape [B, T, H, V] with [B, T, H] = {(batch, length, heads)} from r, got {tuple(v.shape)}")
    value_dim = v.shape[3]
    if tuple(bonus.shape) != (heads, key_dim):
        raise ValueError(f"bonus must have shape [H, K] = {(heads, key_dim)}, got {tuple(bonus.shape)}")
    if tuple(state.shape) != (batch, heads, key_dim, value_dim):
        raise ValueError(f"state must have shape [B, H, K, V] = {(batch, heads, key_dim, value_dim)}, got {tuple(state.shape)}")


def rwkv5_recurrence_step(r_t, k_t, v_t, log_decay_t, bonus, state):
    """One token: r_t, k_t: [B, H, K]; v_t: [B, H, V]; log_decay_t: [B, H, K] (or [H, K], the same for
    every row); bonus: [H, K]; state: [B, H, K, V] -> (y_t [B, H, V], new state), in the state's dtype.

    No validation (it runs once per decoded token; the layer checks its state once per call).
    """
    dtype = state.dtype
    r_t, k_t, v_t, log_decay_t, bonus = (t.to(dtype) for t in (r_t, k_t, v_t, log_decay_t, bonus))
    kv = k_t[..., :, None] * v_t[..., None, :]  # [B, H, K, V]
    y_t = torch.einsum("bhk,bhkv->bhv", r_t, state + bonus[None, :, :, None] * kv)
    return y_t, torch.exp(log_decay_t)[..., None] * state + kv


def rwkv5_recurrence_reference(r, k, v, log_decay, bonus, state):
    """Token by token (the oracle). r, k, log_decay: [B, T, H, K]; v: [B, T, H, V]; bonus: [H, K];
    state: [B, H, K, V].

    Returns ``y [B, T, H, V]`` and the final state ``[B, H, K, V]``, both in the dtype of ``state``.
    """
    _check_inputs(r, k, v, log_decay, bonus, state)
    outputs = []
    for t in range(r.shape[1]):
        y_t, state = rwkv5_recurrence_step(r[:, t], k[:, t], v[:, t], log_decay[:, t], bonus, state)
        outputs.append(y_t)
    if not outputs:
        return r.new_zeros(r.shape[0], 0, r.shape[2], v.shape[3], dtype=state.dtype), state
    return torch.stack(outputs, dim=1), state


def rwkv5_recurrence(r, k, v, log_decay, bonus, state, chunk_size: int = 16):
    """Chunked form of :func:`rwkv5_recurrence_reference` (same arguments and results).

    Time O(T C (K + V)) per head and memory O(B C^2 H K) per chunk for ``C = chunk_size``; the
    Python loop runs T / chunk_size times.
    """
    require_positive_int("chunk_size", chunk_size)
    _check_inputs(r, k, v, log_decay, bonus, state)
    dtype = state.dtype
    r, k, v, log_decay = (t.to(dtype) for t in (r, k, v, log_decay))
    bonus = bonus.to(dtype)
    outputs = []
    for start in range(0, r.shape[1], chunk_size):
        rc, kc, vc, wc = (t[:, start : start + chunk_size] for t in (r, k, v, log_decay))
        size = rc.shape[1]
        inclusive = wc.cumsum(dim=1)  # [B, C, H, K]: log decay from the chunk start through token i
        exclusive = inclusive - wc  # ... through token i - 1
        # from the carried-in state: S_{i-1} holds exp(exclusive_i) * S_start
        y = torch.einsum("bihk,bhkv->bihv", rc * torch.exp(exclusive), state)
        # within the chunk, j < i: k_j v_j decayed by the tokens j+1 .. i-1
        earlier = torch.ones(size, size, dtype=torch.bool, device=r.device).tril(-1)[None, :, :, None, None]
        exponent = (exclusive[:, :, None] - inclusive[:, None, :]).masked_fill(~earlier, float("-inf"))
        scores = torch.einsum("bihk,bjhk,bijhk->bhij", rc, kc, torch.exp(exponent))
        y = y + torch.einsum("bhij,bjhv->bihv", scores, vc)
        y = y + (rc * bonus * kc).sum(-1, keepdim=True) * vc  # the current token, with the bonus
        outputs.append(y)
        total = inclusive[:, -1]  # [B, H, K]
        carried = kc * torch.exp(total[:, None] - inclusive)  # decay of k_j to the chunk end
        state = torch.exp(total)[..., None] * state + torch.einsum("bjhk,bjhv->bhkv", carried, vc)
    if not outputs:
        return r.new_zeros(r.shape[0], 0, r.shape[2], v.shape[3], dtype=dtype), state
    return torch.cat(outputs, dim=1), state
