"""Bi-WKV forward in Triton (Vision-RWKV's bidirectional WKV, see :mod:`linmix.ops.wkv`).

Every sum is carried in RWKV-4's max-tracked form ``exp(p) (a, b)``, so no exponent can overflow
for any w, u, k, and -inf keys (padding) contribute nothing. The sequence is cut into chunks of
``chunk_size`` tokens so that the GPU has B * C/32 * T/chunk_size programs at work, not B * C/32:

1. per chunk, in parallel: its own left-to-right and right-to-left sums from an empty state;
2. per (batch, channel block), a loop over the T / chunk_size chunks: the state entering each chunk
   from the left (all keys before it) and from the right (all keys after it), by decaying the
   running state by the chunk's length and merging the chunk's sum;
3. per chunk, in parallel: a left-to-right sweep from the incoming left state stores the state before
   each token; a right-to-left sweep from the incoming right state merges it, the stored one and the
   token's own ``exp(u + k_t)`` term on one shift, and writes y_t.

Work is O(T C); memory is fp32 scratch of 3 [B, T, C] plus 12 [B, T / chunk_size, C]. Inputs are
read in their dtype and computed in fp32. The backward pass recomputes through the O(T) torch form
(:func:`linmix.ops.wkv_chunked.bi_wkv_torch`, called directly, not through the dispatcher
:func:`linmix.ops.wkv.bi_wkv` that sits above this kernel), so training on CUDA gets the kernel's
forward with exact torch gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linmix.ops._wkv_numerics import EMPTY_EXPONENT
from linmix.ops.triton import require_runnable
from linmix.ops.wkv_chunked import bi_wkv_torch


@triton.jit
def _merge(a1, b1, p1, a2, b2, p2):
    # (a, b, p) of exp(p1) (a1, b1) + exp(p2) (a2, b2), on the larger shift.
    p = tl.maximum(p1, p2)
    e1 = tl.exp(p1 - p)
    e2 = tl.exp(p2 - p)
    return a1 * e1 + a2 * e2, b1 * e1 + b2 * e2, p


@triton.jit
def _take_token(a, b, p, w, k, v):
    # The state one token further: decay by exp(-w), then add exp(k) (v, 1) (RWKV-4's stable form).
    decayed = p - w
    new_p = tl.maximum(decayed, k)
    carry = tl.exp(decayed - new_p)
    fresh = tl.exp(k - new_p)
    return carry * a + fresh * v, carry * b + fresh, new_p


@triton.jit
def _chunk_summaries_kernel(
    w_ptr, k_ptr, v_ptr, summary_ptr,
    length, channels, chunk, chunks, stride_b, stride_t,
    EMPTY: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Phase 1, one program per (batch, channel block, chunk): the chunk's own sums from an empty state,
    # left to right (F) and right to left (G). summary: [6, B, N, C] = F (a, b, p), G (a, b, p).
    batch = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    index = tl.program_id(2)
    valid = columns < channels
    w = tl.load(w_ptr + columns, mask=valid, other=0.0).to(tl.float32)
    begin = index * chunk
    end = tl.minimum(begin + chunk, length)
    base = batch * stride_b + columns
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    p = tl.full([BLOCK_C], EMPTY, dtype=tl.float32)
    for t in range(begin, end):
        k = tl.load(k_ptr + base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        a, b, p = _take_token(a, b, p, w, k, v)
    plane = (batch * chunks + index) * channels + columns
    part = tl.num_programs(0) * chunks * channels
    tl.store(summary_ptr + plane, a, mask=valid)
    tl.store(summary_ptr + part + plane, b, mask=valid)
    tl.store(summary_ptr + 2 * part + plane, p, mask=valid)
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    p = tl.full([BLOCK_C], EMPTY, dtype=tl.float32)
    for step in range(0, end - begin):
        t = end - 1 - step
        k = tl.load(k_ptr + base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        a, b, p = _take_token(a, b, p, w, k, v)
    tl.store(summary_ptr + 3 * part + plane, a, mask=valid)
    tl.store(summary_ptr + 4 * part + plane, b, mask=valid)
    tl.store(summary_ptr + 5 * part + plane, p, mask=valid)


@triton.jit
def _chunk_states_kernel(
    w_ptr, summary_ptr, incoming_ptr, length, channels, chunk, chunks,
    EMPTY: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Phase 2, one program per (batch, channel block), a loop over the N chunks: the state entering each
    # chunk from the left (keys before it) and from the right (keys after it). incoming: [6, B, N, C].
    batch = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = columns < channels
    w = tl.load(w_ptr + columns, mask=valid, other=0.0).to(tl.float32)
    part = tl.num_programs(0) * chunks * channels
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    p = tl.full([BLOCK_C], EMPTY, dtype=tl.float32)
    for index in range(0, chunks):
        plane = (batch * chunks + index) * channels + columns
        tl.store(incoming_ptr + plane, a, mask=valid)
        tl.store(incoming_ptr + part + plane, b, mask=valid)
        tl.store(incoming_ptr + 2 * part + plane, p, mask=valid)
        size = (tl.minimum((index + 1) * chunk, length) - index * chunk).to(tl.float32)
        a, b, p = _merge(a, b, p - size * w,
                         tl.load(summary_ptr + plane, mask=valid, other=0.0),
                         tl.load(summary_ptr + part + plane, mask=valid, other=0.0),
                         tl.load(summary_ptr + 2 * part + plane, mask=valid, other=EMPTY))
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    p = tl.full([BLOCK_C], EMPTY, dtype=tl.float32)
    for step in range(0, chunks):
        index = chunks - 1 - step
        plane = (batch * chunks + index) * channels + columns
        tl.store(incoming_ptr + 3 * part + plane, a, mask=valid)
        tl.store(incoming_ptr + 4 * part + plane, b, mask=valid)
        tl.store(incoming_ptr + 5 * part + plane, p, mask=valid)
        size = (tl.minimum((index + 1) * chunk, length) - index * chunk).to(tl.float32)
        a, b, p = _merge(a, b, p - size * w,
                         tl.load(summary_ptr + 3 * part + plane, mask=valid, other=0.0),
                         tl.load(summary_ptr + 4 * part + plane, mask=valid, other=0.0),
                         tl.load(summary_ptr + 5 * part + plane, mask=valid, other=EMPTY))


@triton.jit
def _chunk_output_kernel(
    w_ptr, u_ptr, k_ptr, v_ptr, y_ptr, incoming_ptr, before_ptr,
    length, channels, chunk, chunks, stride_b, stride_t, stride_yb, stride_yt,
    EMPTY: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Phase 3, one program per (batch, channel block, chunk): sweep the chunk left to right from its
    # incoming left state (storing the state before each token), then right to left from its incoming
    # right state, merging both with the token's own exp(u + k) term into y.
    batch = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    index = tl.program_id(2)
    valid = columns < channels
    w = tl.load(w_ptr + columns, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + columns, mask=valid, other=0.0).to(tl.float32)
    begin = index * chunk
    end = tl.minimum(begin + chunk, length)
    base = batch * stride_b + columns
    scratch = batch * length * channels + columns  # before_ptr: contiguous [3, B, T, C]
    scratch_part = tl.num_programs(0) * length * channels
    part = tl.num_programs(0) * chunks * channels
    plane = (batch * chunks + index) * channels + columns
    a = tl.load(incoming_ptr + plane, mask=valid, other=0.0)
    b = tl.load(incoming_ptr + part + plane, mask=valid, other=0.0)
    p = tl.load(incoming_ptr + 2 * part + plane, mask=valid, other=EMPTY)
    for t in range(begin, end):
        tl.store(before_ptr + scratch + t * channels, a, mask=valid)
        tl.store(before_ptr + scratch_part + scratch + t * channels, b, mask=valid)
        tl.store(before_ptr + 2 * scratch_part + scratch + t * channels, p, mask=valid)
        k = tl.load(k_ptr + base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        a, b, p = _take_token(a, b, p, w, k, v)
    a = tl.load(incoming_ptr + 3 * part + plane, mask=valid, other=0.0)
    b = tl.load(incoming_ptr + 4 * part + plane, mask=valid, other=0.0)
    p = tl.load(incoming_ptr + 5 * part + plane, mask=valid, other=EMPTY)
    for step in range(0, end - begin):
        t = end - 1 - step
        k = tl.load(k_ptr + base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        before_a = tl.load(before_ptr + scratch + t * channels, mask=valid, other=0.0)
        before_b = tl.load(before_ptr + scratch_part + scratch + t * channels, mask=valid, other=0.0)
        before_p = tl.load(before_ptr + 2 * scratch_part + scratch + t * channels, mask=valid, other=EMPTY)
        numerator, denominator, shift = _merge(before_a, before_b, before_p, a, b, p)
        numerator, denominator, _ = _merge(numerator, denominator, shift, v, tl.full([BLOCK_C], 1.0, tl.float32), u + k)
        positive = denominator > 0
        y = tl.where(positive, numerator / tl.where(positive, denominator, 1.0), 0.0)
        tl.store(y_ptr + batch * stride_yb + t * stride_yt + columns, y.to(y_ptr.dtype.element_ty), mask=valid)
        a, b, p = _take_token(a, b, p, w, k, v)


def bi_wkv_forward_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64) -> torch.Tensor:
    """Bi-WKV forward: w, u [C]; k, v [B, T, C] -> y [B, T, C] in the promoted dtype of k, v.

    Three launches: chunk summaries (parallel over chunks), the states entering each chunk (a loop
    over T / chunk_size chunks), and the outputs (parallel over chunks). No autograd (see
    :func:`bi_wkv_triton`). Inputs are validated by the caller.
    """
    require_runnable(_chunk_output_kernel, w, u, k, v)
    batch, length, channels = k.shape
    out_dtype = torch.promote_types(k.dtype, v.dtype)
    k = k.to(out_dtype).contiguous()
    v = v.to(out_dtype).contiguous()
    w, u = w.contiguous(), u.contiguous()
    y = torch.empty(batch, length, channels, device=k.device, dtype=out_dtype)
    if y.numel() == 0:
        return y
    chunk = min(chunk_size, length)
    chunks = triton.cdiv(length, chunk)
    summary = torch.empty(6, batch, chunks, channels, device=k.device, dtype=torch.float32)
    incoming = torch.empty_like(summary)
    before = torch.empty(3, batch, length, channels, device=k.device, dtype=torch.float32)
    block_c = min(32, triton.next_power_of_2(channels))
    channel_blocks = triton.cdiv(channels, block_c)
    common = dict(EMPTY=EMPTY_EXPONENT, BLOCK_C=block_c)
    _chunk_summaries_kernel[(batch, channel_blocks, chunks)](
        w, k, v, summary, length, channels, chunk, chunks, k.stride(0), k.stride(1), **common)
    _chunk_states_kernel[(batch, channel_blocks)](w, summary, incoming, length, channels, chunk, chunks, **common)
    _chunk_output_kernel[(batch, channel_blocks, chunks)](
        w, u, k, v, y, incoming, before, length, channels, chunk, chunks,
        k.stride(0), k.stride(1), y.stride(0), y.stride(1), **common)
    return y


class _BiWKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, chunk_size):
        ctx.save_for_backward(w, u, k, v)
        ctx.chunk_size = chunk_size
        return bi_wkv_forward_triton(w, u, k, v, chunk_size=chunk_size)

    @staticmethod
    def backward(ctx, grad_y):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            y = bi_wkv_torch(*inputs, chunk_size=ctx.chunk_size)
            grads = iter(torch.autograd.grad(y, wanted, grad_y))
        return (*[next(grads) if t.requires_grad else None for t in inputs], None)


def bi_wkv_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64) -> torch.Tensor:
    """Bi-WKV with the Triton forward and, under autograd, gradients of the O(T) torch form
    (recomputed in backward with ``chunk_size``)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v)):
        return _BiWKVFunction.apply(w, u, k, v, chunk_size)
    return bi_wkv_forward_triton(w, u, k, v, chunk_size=chunk_size)
