"""Bi-WKV with one shift for the whole sequence: the fast form for Vision-RWKV's decays.

Same sum as :func:`linmix.ops.wkv.bi_wkv_reference` (layout ``k, v: [B, T, C]``, ``w, u: [C]``)::

    y_t = [ sum_{i != t} exp(-(|t-i|-1) w + k_i) v_i + exp(u + k_t) v_t ] / [ same with v = 1 ]

Vision-RWKV passes ``w / T``, so the decay across the *whole* sequence, ``(T - 1) |w|``, is the
raw decay, a few units. Then one shift suffices: with ``x_i = exp(k_i - max_i k_i) (v_i, 1)``,

    forward part  = exp(-(t-1) w) * sum_{i<t} exp(i w) x_i
    backward part = exp((t+1) w)  * sum_{i>t} exp(-i w) x_i

and every factor ``exp(+-i w)`` stays within ``exp(+-(T-1)|w|)``. The max-key token reaches every
query with weight at least ``exp(-(T-1)|w|)``, so keys that underflow after the shift are negligible
for every query, not just on average. The exclusive prefix / suffix sums are one GEMM per direction
with a strictly triangular ``[L+1, L]`` matrix of ones over blocks of L tokens (its last row gives
the block totals), plus a cumulative sum of block totals: no subtraction anywhere, so no
cancellation. About 20 elementwise passes over ``[B, T, C]`` and two GEMMs, against ~50 passes with
full-size ``where`` / ``cat`` / ``cumsum`` of the chunked prefix-sum form in :mod:`linmix.ops.wkv`.

Exact to fp32 rounding while :func:`one_shift_applicable` holds (``(T-1) max|w| <= 20`` and
``max|u| <= 60``); :func:`linmix.ops.wkv.bi_wkv` uses the chunked form otherwise and when tracing
for export.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from linmix.ops._wkv_numerics import EMPTY_EXPONENT

MAX_SEQUENCE_DECAY = 20.0  # (T - 1) * max|w|: exp(+-20) leaves fp32 ample range for sums of T terms
MAX_BONUS = 60.0  # max|u|


def one_shift_applicable(w: torch.Tensor, u: torch.Tensor, length: int) -> bool:
    """Whether :func:`bi_wkv_one_shift` is exact for these decays, bonuses and length (reads two scalars)."""
    w_max = float(w.detach().abs().max()) if w.numel() else 0.0
    u_max = float(u.detach().abs().max()) if u.numel() else 0.0
    # The slack absorbs fp32 rounding of w = raw / T (e.g. 4095 * (20 / 4095) > 20 in fp32).
    return (length - 1) * w_max <= MAX_SEQUENCE_DECAY * (1 + 1e-5) and u_max <= MAX_BONUS


@functools.lru_cache(maxsize=32)
def _sum_matrices(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Strictly lower / upper triangular ones with a last row of ones, ``[L+1, L]`` each (cached)."""
    ones = torch.ones(size, size, device=device, dtype=dtype)
    row_of_ones = torch.ones(1, size, device=device, dtype=dtype)
    return torch.cat([ones.tril(-1), row_of_ones]), torch.cat([ones.triu(1), row_of_ones])


def _exclusive_sums(x: torch.Tensor, matrix: torch.Tensor, *, reverse: bool) -> torch.Tensor:
    """Exclusive prefix (or suffix, ``reverse``) sums along dim -2 of ``x: [..., N, L, C]``.

    ``matrix: [L+1, L]`` is strictly lower (upper for ``reverse``) triangular ones with a last row
    of ones; the block totals it yields are carried across blocks with a shifted cumulative sum.
    """
    size = x.shape[-2]
    mixed = torch.matmul(matrix, x)  # [..., N, L+1, C]
    within, totals = mixed[..., :size, :], mixed[..., size, :]  # totals: [..., N, C]
    if x.shape[-3] == 1:
        return within
    if reverse:
        inclusive = totals.flip(-2).cumsum(-2).flip(-2)
        carry = torch.cat([inclusive[..., 1:, :], torch.zeros_like(inclusive[..., :1, :])], dim=-2)
    else:
        inclusive = totals.cumsum(-2)
        carry = torch.cat([torch.zeros_like(inclusive[..., :1, :]), inclusive[..., :-1, :]], dim=-2)
    return within + carry[..., None, :]


def bi_wkv_one_shift(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 64) -> torch.Tensor:
    """Bi-WKV of ``k, v: [B, T, C]`` with ``w, u: [C]`` -> ``[B, T, C]``.

    Inputs validated by the caller and all of one floating dtype (fp32 or fp64); exact while
    :func:`one_shift_applicable` holds. Differentiable (the shift is detached: the sum does not
    depend on it). Keys may be ``-inf``; a channel with every key masked gives 0.
    """
    batch, length, channels = k.shape
    size = min(block_size, length)
    pad = (-length) % size
    if pad:  # padded keys are -inf: they contribute nothing
        k = F.pad(k, (0, 0, 0, pad), value=float("-inf"))
        v = F.pad(v, (0, 0, 0, pad))
    padded = k.shape[1]
    blocks = padded // size
    dtype, device = k.dtype, k.device

    # [B, 1, C]; a channel whose keys are all -inf gets a finite shift, so k - shift is -inf, not NaN
    shift = k.amax(dim=1, keepdim=True).clamp_min(EMPTY_EXPONENT).detach()
    weights = torch.exp(k - shift)
    terms = torch.stack((weights * v, weights))  # (numerator, denominator) terms: [2, B, T, C]

    position = torch.arange(padded, device=device, dtype=dtype)[:, None]
    rise = torch.exp(position * w)  # exp(i w): [T, C]
    fall = torch.exp(-position * w)  # exp(-i w)
    lower, upper = _sum_matrices(size, dtype, device)

    def blocked(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(2, batch, blocks, size, channels)

    before = _exclusive_sums(blocked(terms * rise), lower, reverse=False)  # sum_{i<t} exp(i w) x_i
    after = _exclusive_sums(blocked(terms * fall), upper, reverse=True)  # sum_{i>t} exp(-i w) x_i
    exp_w = torch.exp(w)
    # exp(u) x_t + exp(-(t-1) w) before_t + exp((t+1) w) after_t, as one multiply and two fused
    # multiply-adds (three passes over [2, B, T, C] instead of five).
    total = torch.addcmul(torch.exp(u) * terms, before.reshape(2, batch, padded, channels), fall * exp_w)
    total = torch.addcmul(total, after.reshape(2, batch, padded, channels), rise * exp_w)
    numerator, denominator = total.unbind(0)
    # The denominator is 0 only where every key of the channel is masked (then so is the numerator).
    y = numerator / denominator.clamp_min(torch.finfo(dtype).tiny)
    return y[:, :length]
