"""Triton forward of :func:`linmix.ops.selective_scan.cross_scan_selective_scan` (K scan directions
over one token grid, summed).

One program per (batch row, direction, block of channels) walks the T tokens in its direction's order
(an int64 order table, row k = the grid tokens in scan order) with the ``[BLOCK_D, N]`` state in
registers: softplus of the step, the decay ``exp(delta * A)``, the state update, the readout
``<h, C>`` and the D skip are fused into one pass, and every tensor is read in grid order through its
strides, so no permuted copy of the map is made. Each direction writes its own ``[B, K, T, D]`` fp32
slice (no atomics), summed over K afterwards. Under autograd, the gradients are those of the torch
chunked form, recomputed in backward (as :mod:`linmix.ops.triton.bi_wkv` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linmix.ops.selective_scan_torch import _cross_scan_torch, scan_order_table
from linmix.ops.triton import require_runnable


@triton.jit
def _cross_scan_kernel(
    u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, skip_ptr, bias_ptr, order_ptr, y_ptr,
    length, channels, state_size, count,
    stride_u_batch, stride_u_token,
    stride_delta_batch, stride_delta_dir, stride_delta_token,
    stride_bc_batch, stride_bc_dir, stride_bc_token,
    HAS_SKIP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch_dir = tl.program_id(0)
    batch, direction = batch_dir // count, batch_dir % count
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_mask, n_mask = d < channels, n < state_size
    A = tl.load(a_ptr + (direction * channels + d[:, None]) * state_size + n[None, :],
                mask=d_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_SKIP:
        skip = tl.load(skip_ptr + direction * channels + d, mask=d_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + direction * channels + d, mask=d_mask, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    u_base = u_ptr + batch * stride_u_batch
    delta_base = delta_ptr + batch * stride_delta_batch + direction * stride_delta_dir
    bc_offset = batch * stride_bc_batch + direction * stride_bc_dir
    y_base = y_ptr + (batch * count + direction) * length * channels
    for step in range(0, length):
        p = tl.load(order_ptr + direction * length + step)
        u = tl.load(u_base + p * stride_u_token + d, mask=d_mask, other=0.0).to(tl.float32)
        dt = tl.load(delta_base + p * stride_delta_token + d, mask=d_mask, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            dt = tl.maximum(dt, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(dt)))
        B = tl.load(b_ptr + bc_offset + p * stride_bc_token + n, mask=n_mask, other=0.0).to(tl.float32)
        C = tl.load(c_ptr + bc_offset + p * stride_bc_token + n, mask=n_mask, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B[None, :]
        y = tl.sum(h * C[None, :], axis=1) + skip * u
        tl.store(y_base + p * channels + d, y, mask=d_mask)


def cross_scan_forward_triton(u, delta, A, B, C, D, delta_bias, *, order: torch.Tensor, delta_softplus: bool) -> torch.Tensor:
    """The forward in the op's layout (validated by the caller); ``order: [K, T]`` int64 on u's device.
    Returns ``[B, T, D]`` in u.dtype."""
    batch, length, channels = u.shape
    count, state_size = order.shape[0], A.shape[-1]
    u = u if u.stride(2) == 1 else u.contiguous()
    delta = delta if delta.stride(3) == 1 else delta.contiguous()
    if B.stride(3) != 1 or C.stride(3) != 1 or B.stride() != C.stride():
        B, C = B.contiguous(), C.contiguous()
    A = A.contiguous()
    skip = D.contiguous() if D is not None else A  # a placeholder pointer when unused
    bias = delta_bias.contiguous() if delta_bias is not None else A
    require_runnable(_cross_scan_kernel, u, delta, A, B, C)
    per_direction = torch.empty((batch, count, length, channels), device=u.device, dtype=torch.float32)
    block_d = min(64, triton.next_power_of_2(channels))
    block_n = triton.next_power_of_2(state_size)
    _cross_scan_kernel[(batch * count, triton.cdiv(channels, block_d))](
        u, delta, A, B, C, skip, bias, order, per_direction,
        length, channels, state_size, count,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), delta.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        HAS_SKIP=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return per_direction.sum(dim=1).to(u.dtype)


class _CrossScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, height, width, directions, delta_softplus, order):
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.settings = (height, width, directions, delta_softplus)
        return cross_scan_forward_triton(u, delta, A, B, C, D, delta_bias, order=order, delta_softplus=delta_softplus)

    @staticmethod
    def backward(ctx, grad_y):
        height, width, directions, delta_softplus = ctx.settings
        inputs = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            u, delta, A, B, C, D, delta_bias = inputs
            y = _cross_scan_torch(u, delta, A, B, C, D, delta_bias, height, width, directions, delta_softplus,
                                  "chunked", None).to(u.dtype)
            grads = iter(torch.autograd.grad(y, wanted, grad_y))
        return (*[next(grads) if t is not None and t.requires_grad else None for t in inputs], None, None, None, None, None)


def cross_scan_selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, *, height: int, width: int,
                                     directions, delta_softplus: bool = False) -> torch.Tensor:
    """Cross-scan selective scan with the Triton forward and, under autograd, the gradients of the
    torch chunked form (recomputed in backward). Inputs are validated by the caller."""
    order = scan_order_table(directions, height, width).to(u.device)
    tensors = [t for t in (u, delta, A, B, C, D, delta_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _CrossScanFunction.apply(u, delta, A, B, C, D, delta_bias, height, width, tuple(directions), delta_softplus, order)
    return cross_scan_forward_triton(u, delta, A, B, C, D, delta_bias, order=order, delta_softplus=delta_softplus)
