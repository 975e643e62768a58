"""The torch forms of Bidirectional WKV (Vision-RWKV's Bi-WKV, see :mod:`linmix.ops.wkv`) and the
choice between them: the chunked prefix-sum form of this module and the one-shift form of
:mod:`linmix.ops.wkv_one_shift`.

This module sits below every Bi-WKV dispatcher and kernel: :func:`linmix.ops.wkv.bi_wkv` (the
public op, choosing Triton / native C / torch) calls :func:`bi_wkv_torch`, and so does the Triton
kernel's backward, directly, without going back through the dispatcher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmix.ops._checks import accumulation_dtype, tracing_or_exporting
from linmix.ops._wkv_numerics import NEG_INF, exclusive_cumsum, exclusive_reverse_cumsum, finite_or_zero, safe_divide, safe_log
from linmix.ops.wkv_one_shift import bi_wkv_one_shift, one_shift_applicable

__all__ = ["BI_WKV_FORMS", "bi_wkv_chunked", "bi_wkv_torch"]

BI_WKV_FORMS = ("auto", "one_shift", "chunked")


def bi_wkv_torch(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64,
                 form: str = "auto") -> torch.Tensor:
    """Bi-WKV by its torch forms: w, u: [C]; k, v: [B, T, C] -> [B, T, C] in the promoted dtype of k, v.

    Inputs are validated by the caller (:func:`linmix.ops.wkv.bi_wkv`); half precision is computed
    in fp32. ``form``: "one_shift" (:func:`linmix.ops.wkv_one_shift.bi_wkv_one_shift`, about 4x
    faster on CPU, exact while ``(T - 1) max|w| <= 20``), "chunked" (:func:`bi_wkv_chunked`, exact
    for any decay given a small enough ``chunk_size``, free of data-dependent Python control flow),
    or "auto": one-shift where it is exact, chunked otherwise and always while tracing, exporting
    or compiling (deciding for one-shift reads two scalars of w and u, which a graph cannot do).
    Differentiable by autograd.
    """
    if form not in BI_WKV_FORMS:
        raise ValueError(f"form must be one of {BI_WKV_FORMS}, got {form!r}")
    out_dtype = torch.promote_types(k.dtype, v.dtype)
    dtype = accumulation_dtype(out_dtype)
    w, u, k, v = (t.to(dtype) for t in (w, u, k, v))
    if form == "one_shift" or (form == "auto" and not tracing_or_exporting(w, u, k, v) and one_shift_applicable(w, u, k.shape[1])):
        return bi_wkv_one_shift(w, u, k, v, block_size=chunk_size).to(out_dtype)
    return bi_wkv_chunked(w, u, k, v, chunk_size=chunk_size).to(out_dtype)


def bi_wkv_chunked(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64) -> torch.Tensor:
    """Bi-WKV by chunked prefix / suffix sums: w, u: [C]; k, v: [B, T, C] -> [B, T, C].

    Inputs validated by the caller and all of one floating dtype (fp32 or fp64). Written with
    cumsum, exp, max and where only (no loop over time), so it is differentiable by autograd and
    exports to ONNX with a dynamic T.

    The forward-direction sum of token t is ``exp(-(t-1) w) * sum_{i<t} exp(k_i + i w) v_i``
    (the backward one uses ``k_i - i w``). A single shift for the whole sequence is exact only while
    ``T |w|`` is moderate, so the sequence is cut into chunks of ``chunk_size`` tokens:

    - inside a chunk, prefix / suffix sums of ``exp(k_i +- j w - m_chunk)`` with chunk-local offsets
      ``j`` and the chunk's own max ``m_chunk``;
    - across chunks, each chunk's total (a fixed mix of its tokens, whatever the query outside it)
      is combined with a chunk x chunk matrix of exponents ``m_c' -+ (c - c') chunk_size w``
      shifted by its row max, exactly like the quadratic oracle at chunk granularity;
    - the parts of each token (forward, backward, its own bonus term) are added in the log domain.

    Nothing can overflow or turn into NaN for any finite w, u, k. The result is exact to fp32
    rounding while ``chunk_size * |w|`` stays below about 20 (the in-chunk prefix sums then span
    less than e^40 of the e^87 fp32 range): with Vision-RWKV's ``w / T`` this holds for any T
    whenever |w| <= 20, since the in-chunk span is at most ``(T - 1) |w| / T``. For large per-token
    ``|w|`` pass a smaller ``chunk_size`` (``chunk_size=1`` has no in-chunk sums and holds for any
    w, at O(T^2) cost). Whatever the chunking, the sum is conditioned like ``T |w| eps`` in w, so
    fp32 results carry that much error once ``T |w|`` is in the hundreds.
    Memory is O(B T C + B (T / chunk_size)^2 C). A torch.export / ONNX graph keeps T dynamic
    (torch.export specialises away T <= chunk_size; the ONNX graph runs every T).
    """
    dtype = k.dtype
    batch, length, channels = k.shape
    size = chunk_size

    # Pad T up to whole chunks with keys that contribute nothing (the last chunk keeps >= 1 real token).
    pad = (-length) % size
    k = F.pad(k, (0, 0, 0, pad), value=NEG_INF)
    v = F.pad(v, (0, 0, 0, pad))
    k = k.reshape(batch, -1, size, channels)  # [B, N, L, C]
    v = v.reshape(batch, -1, size, channels)
    chunks = k.shape[1]

    offset = torch.arange(size, device=k.device, dtype=dtype)[:, None]  # j, [L, 1]
    ramp = offset * w  # j w, [L, C]

    def one_direction(sign: float):
        # sign +1: keys before the query (exponent k_i + j_i w); -1: keys after it (k_i - j_i w).
        exponent = k + sign * ramp  # [B, N, L, C]
        chunk_max = exponent.amax(dim=2, keepdim=True).detach()  # [B, N, 1, C], -inf for an empty chunk
        terms = torch.exp(exponent - finite_or_zero(chunk_max))
        weighted = terms * v
        if sign > 0:
            inner_num, inner_den = exclusive_cumsum(weighted, 2), exclusive_cumsum(terms, 2)
        else:
            inner_num, inner_den = exclusive_reverse_cumsum(weighted, 2), exclusive_reverse_cumsum(terms, 2)
        total_num, total_den = weighted.sum(dim=2), terms.sum(dim=2)  # chunk totals [B, N, C], scale chunk_max

        # Chunk c receives chunk c' (c' < c forward, c' > c backward) with exponent
        # chunk_max[c'] - |c - c'| L w, on top of its per-token factor.
        index = torch.arange(chunks, device=k.device)
        gap = index[:, None] - index[None, :]  # c - c', [N, N]
        receives = gap > 0 if sign > 0 else gap < 0
        gap_decay = (gap.abs().to(dtype) * size)[..., None] * w  # [N, N, C]
        cross = chunk_max[:, None, :, 0, :] - gap_decay  # [B, N(c), N(c'), C]
        cross = torch.where(receives[None, :, :, None], cross, torch.full_like(cross, NEG_INF))
        cross_max = cross.amax(dim=2).detach()  # [B, N, C], -inf for a chunk receiving nothing
        cross_weights = torch.exp(cross - finite_or_zero(cross_max)[:, :, None, :])
        outer_num = (cross_weights * total_num[:, None]).sum(dim=2)
        outer_den = (cross_weights * total_den[:, None]).sum(dim=2)

        # Merge the in-chunk and cross-chunk sums on one shift per chunk.
        chunk_max = chunk_max[:, :, 0, :]
        shift = torch.maximum(chunk_max, cross_max)
        safe_shift = finite_or_zero(shift)
        inner_scale = torch.exp(chunk_max - safe_shift)[:, :, None, :]
        outer_scale = torch.exp(cross_max - safe_shift)[:, :, None, :]
        numerator = inner_num * inner_scale + outer_num[:, :, None, :] * outer_scale
        denominator = inner_den * inner_scale + outer_den[:, :, None, :] * outer_scale
        # Per-token factor: exp(-(j-1) w) forward, exp((j+1) w) backward.
        log_scale = safe_shift[:, :, None, :] - sign * (offset - sign) * w
        return numerator, denominator, log_scale

    parts = []
    for sign in (1.0, -1.0):
        numerator, denominator, log_scale = one_direction(sign)
        # Each part as (its mean of v, its log-weight): a tiny sum at a large scale stays exact.
        parts.append((safe_divide(numerator, denominator), log_scale + safe_log(denominator)))
    parts.append((v, u + k))  # the token's own term
    top = finite_or_zero(torch.maximum(torch.maximum(parts[0][1], parts[1][1]), parts[2][1])).detach()
    numerator = torch.zeros_like(v)
    denominator = torch.zeros_like(v)
    for mean, log_weight in parts:
        weight = torch.exp(log_weight - top)
        numerator = numerator + weight * mean
        denominator = denominator + weight
    y = safe_divide(numerator, denominator)
    return y.reshape(batch, -1, channels)[:, :length]
