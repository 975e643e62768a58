"""Bi-WKV forward as one Triton kernel (Vision-RWKV's bidirectional WKV, see :mod:`linmix.ops.wkv`).

One program per (batch, block of BLOCK_C channels) sweeps the sequence twice, like Vision-RWKV's CUDA
kernel but in RWKV-4's max-tracked form so that no exponent can overflow for any w, u, k:

1. left to right: the state ``(a, b, p)`` of the keys before token t, ``exp(p) (a, b) =
   sum_{i<t} exp(-(t-1-i) w + k_i) (v_i, 1)``, is written to a scratch buffer, then takes token t in;
2. right to left: the same state of the keys after token t; it is merged with the stored forward
   state and the token's own ``exp(u + k_t)`` term on one shift, and y_t is written.

Work is O(T C) with a sequential loop over T per channel block (T is the number of image tokens,
e.g. 4096 at 1024 px for RWKV-SAM's 16x16 stage); memory is three fp32 [B, T, C] scratch tensors.
Inputs are read in their dtype and computed in fp32. The backward pass recomputes through the O(T)
torch form (:func:`linmix.ops.wkv.bi_wkv`), so training on CUDA gets the kernel's forward with exact
torch gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linmix.ops.triton import require_runnable

_EMPTY_EXPONENT = -1e38  # an empty state's shift, as in linmix.ops.wkv


@triton.jit
def _bi_wkv_forward_kernel(
    w_ptr, u_ptr, k_ptr, v_ptr, y_ptr, state_a_ptr, state_b_ptr, state_p_ptr,
    length, channels,
    stride_b, stride_t,
    stride_yb, stride_yt,
    EMPTY: tl.constexpr, BLOCK_C: tl.constexpr,
):
    batch = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = columns < channels
    w = tl.load(w_ptr + columns, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + columns, mask=valid, other=0.0).to(tl.float32)
    k_base = k_ptr + batch * stride_b + columns
    v_base = v_ptr + batch * stride_b + columns
    scratch = batch * length * channels + columns  # scratch tensors are contiguous [B, T, C]

    # 1. keys before t
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    p = tl.full([BLOCK_C], EMPTY, dtype=tl.float32)
    for t in range(0, length):
        tl.store(state_a_ptr + scratch + t * channels, a, mask=valid)
        tl.store(state_b_ptr + scratch + t * channels, b, mask=valid)
        tl.store(state_p_ptr + scratch + t * channels, p, mask=valid)
        k = tl.load(k_base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        decayed = p - w
        new_p = tl.maximum(decayed, k)
        carry = tl.exp(decayed - new_p)
        fresh = tl.exp(k - new_p)
        a = carry * a + fresh * v
        b = carry * b + fresh
        p = new_p

    # 2. keys after t, merged with the keys before t and the token's own term
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    p = tl.full([BLOCK_C], EMPTY, dtype=tl.float32)
    for step in range(0, length):
        t = length - 1 - step
        k = tl.load(k_base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * stride_t, mask=valid, other=0.0).to(tl.float32)
        before_a = tl.load(state_a_ptr + scratch + t * channels, mask=valid, other=0.0)
        before_b = tl.load(state_b_ptr + scratch + t * channels, mask=valid, other=0.0)
        before_p = tl.load(state_p_ptr + scratch + t * channels, mask=valid, other=EMPTY)
        own = u + k
        shift = tl.maximum(tl.maximum(before_p, p), own)  # finite: the state shifts are >= about EMPTY
        weight_before = tl.exp(before_p - shift)
        weight_after = tl.exp(p - shift)
        weight_own = tl.exp(own - shift)
        numerator = weight_before * before_a + weight_after * a + weight_own * v
        denominator = weight_before * before_b + weight_after * b + weight_own
        positive = denominator > 0
        y = tl.where(positive, numerator / tl.where(positive, denominator, 1.0), 0.0)
        tl.store(y_ptr + batch * stride_yb + t * stride_yt + columns, y.to(y_ptr.dtype.element_ty), mask=valid)
        decayed = p - w
        new_p = tl.maximum(decayed, k)
        carry = tl.exp(decayed - new_p)
        fresh = tl.exp(k - new_p)
        a = carry * a + fresh * v
        b = carry * b + fresh
        p = new_p


def bi_wkv_forward_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV forward: w, u [C]; k, v [B, T, C] -> y [B, T, C] in the promoted dtype of k, v.

    No autograd (see :func:`bi_wkv_triton`). Inputs are validated by the caller.
    """
    require_runnable(_bi_wkv_forward_kernel, w, u, k, v)
    batch, length, channels = k.shape
    out_dtype = torch.promote_types(k.dtype, v.dtype)
    k = k.to(out_dtype).contiguous()
    v = v.to(out_dtype).contiguous()
    w, u = w.contiguous(), u.contiguous()
    y = torch.empty(batch, length, channels, device=k.device, dtype=out_dtype)
    if y.numel() == 0:
        return y
    state_a, state_b, state_p = (torch.empty(batch, length, channels, device=k.device, dtype=torch.float32) for _ in range(3))
    block_c = min(64, triton.next_power_of_2(channels))
    grid = (batch, triton.cdiv(channels, block_c))
    _bi_wkv_forward_kernel[grid](
        w, u, k, v, y, state_a, state_b, state_p, length, channels,
        k.stride(0), k.stride(1), y.stride(0), y.stride(1),
        EMPTY=_EMPTY_EXPONENT, BLOCK_C=block_c,
    )
    return y


class _BiWKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, chunk_size):
        ctx.save_for_backward(w, u, k, v)
        ctx.chunk_size = chunk_size
        return bi_wkv_forward_triton(w, u, k, v)

    @staticmethod
    def backward(ctx, grad_y):
        from linmix.ops.wkv import bi_wkv

        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            y = bi_wkv(*inputs, chunk_size=ctx.chunk_size, backend="torch")
            grads = iter(torch.autograd.grad(y, wanted, grad_y))
        return (*[next(grads) if t.requires_grad else None for t in inputs], None)


def bi_wkv_triton(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64) -> torch.Tensor:
    """Bi-WKV with the Triton forward and, under autograd, gradients of the O(T) torch form
    (recomputed in backward with ``chunk_size``)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v)):
        return _BiWKVFunction.apply(w, u, k, v, chunk_size)
    return bi_wkv_forward_triton(w, u, k, v)
