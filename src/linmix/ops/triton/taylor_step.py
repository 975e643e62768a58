"""Fused linear-attention decode step with BASED's Taylor feature map, one Triton kernel per call.

One program per (batch, head) does, in one pass over the state:

    phi(q), phi(k)   from q_t, k_t [f] (the features are built in registers, never stored)
    z  += phi(k)                       k_sum [D'] fp32, in place
    S  += phi(k) (x) v_t               kv [D', Dv] fp32, in place, Dv in blocks of BLOCK_V
    y   = phi(q) S / (phi(q) . z + eps)

Decode is memory-bound: the kernel reads and writes the fp32 state once (the torch path reads it
three times and writes it twice, plus the phi tensors). A program owns a whole head so that the
k_sum update and the denominator need no cross-program ordering.

Features follow :func:`linmix.ops.feature_maps.taylor_feature_map` exactly (same row order, so the
state is interchangeable with the torch path's): row r of phi(x) is ``x[a_r] * x[b_r] * c_r`` where
an index of -1 stands for the constant 1 (tables from :func:`taylor_feature_table`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from linmix.ops.triton import require_runnable


@functools.lru_cache(maxsize=None)
def _table_cpu(feature_dim: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    first, second, scale = [-1], [-1], [1.0]
    for i in range(feature_dim):
        first.append(i)
        second.append(-1)
        scale.append(feature_dim ** -0.25)
    for i in range(feature_dim):
        for j in range(i if symmetric else 0, feature_dim):
            first.append(i)
            second.append(j)
            scale.append((2.0 * feature_dim) ** -0.5 if (i == j or not symmetric) else feature_dim ** -0.5)
    return (torch.tensor(first, dtype=torch.int32), torch.tensor(second, dtype=torch.int32),
            torch.tensor(scale, dtype=torch.float32))


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def taylor_feature_table(feature_dim: int, symmetric: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first, second, scale), each [D']: ``phi(x)[r] = x[first[r]] * x[second[r]] * scale[r]``, index -1 = 1."""
    key = (feature_dim, symmetric, str(device))
    if key not in _TABLES:
        _TABLES[key] = tuple(t.to(device) for t in _table_cpu(feature_dim, symmetric))
    return _TABLES[key]


@triton.jit
def _taylor_features(base_ptr, stride, first, second, scale, row_valid):
    # phi(x) [BLOCK_E] in fp32 from x at base_ptr (stride between features); padded rows are 0.
    a = tl.load(base_ptr + tl.where(first >= 0, first, 0) * stride, mask=row_valid & (first >= 0), other=1.0).to(tl.float32)
    b = tl.load(base_ptr + tl.where(second >= 0, second, 0) * stride, mask=row_valid & (second >= 0), other=1.0).to(tl.float32)
    return a * b * scale


@triton.jit
def _taylor_step_kernel(
    q_ptr, k_ptr, v_ptr, kv_ptr, k_sum_ptr, out_ptr, first_ptr, second_ptr, scale_ptr,
    heads, expanded_dim, value_dim, eps,
    stride_qb, stride_qh, stride_qf,
    stride_kb, stride_kh, stride_kf,
    stride_vb, stride_vh, stride_vd,
    stride_sb, stride_sh, stride_se, stride_sd,
    stride_zb, stride_zh, stride_ze,
    stride_ob, stride_oh, stride_od,
    BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr,
):
    program = tl.program_id(0)
    batch = program // heads
    head = program % heads
    rows = tl.arange(0, BLOCK_E)
    row_valid = rows < expanded_dim
    first = tl.load(first_ptr + rows, mask=row_valid, other=-1)
    second = tl.load(second_ptr + rows, mask=row_valid, other=-1)
    scale = tl.load(scale_ptr + rows, mask=row_valid, other=0.0)
    phi_q = _taylor_features(q_ptr + batch * stride_qb + head * stride_qh, stride_qf, first, second, scale, row_valid)
    phi_k = _taylor_features(k_ptr + batch * stride_kb + head * stride_kh, stride_kf, first, second, scale, row_valid)

    z_ptrs = k_sum_ptr + batch * stride_zb + head * stride_zh + rows * stride_ze
    z = tl.load(z_ptrs, mask=row_valid, other=0.0) + phi_k
    tl.store(z_ptrs, z, mask=row_valid)
    denominator = tl.sum(phi_q * z, axis=0) + eps

    state_base = kv_ptr + batch * stride_sb + head * stride_sh
    for start in range(0, value_dim, BLOCK_V):
        columns = start + tl.arange(0, BLOCK_V)
        column_valid = columns < value_dim
        v = tl.load(v_ptr + batch * stride_vb + head * stride_vh + columns * stride_vd, mask=column_valid, other=0.0).to(tl.float32)
        state_ptrs = state_base + rows[:, None] * stride_se + columns[None, :] * stride_sd
        tile_valid = row_valid[:, None] & column_valid[None, :]
        state = tl.load(state_ptrs, mask=tile_valid, other=0.0) + phi_k[:, None] * v[None, :]
        tl.store(state_ptrs, state, mask=tile_valid)
        numerator = tl.sum(phi_q[:, None] * state, axis=0)
        out = numerator / denominator
        tl.store(out_ptr + batch * stride_ob + head * stride_oh + columns * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=column_valid)


def taylor_linear_attention_step(
    kv: torch.Tensor, k_sum: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
    *, symmetric: bool = True, eps: float = 1e-12,
) -> torch.Tensor:
    """One decode token, fused. kv [B, H, D', Dv] and k_sum [B, H, D'] (fp32) are updated in place.

    q_t, k_t: [B, H, f]; v_t: [B, H, Dv]. Returns y_t [B, H, Dv] in v_t's dtype. Shapes and dtypes
    are validated by the caller (:func:`linmix.ops.linear_attention_step`).
    """
    require_runnable(_taylor_step_kernel, kv, k_sum, q_t, k_t, v_t)
    batch, heads, feature_dim = q_t.shape
    expanded_dim, value_dim = kv.shape[2], kv.shape[3]
    first, second, scale = taylor_feature_table(feature_dim, symmetric, q_t.device)
    if first.numel() != expanded_dim:
        raise ValueError(f"Taylor map of f = {feature_dim} gives D' = {first.numel()} but the state holds D' = {expanded_dim}")
    out = torch.empty(batch, heads, value_dim, device=v_t.device, dtype=v_t.dtype)
    block_e = triton.next_power_of_2(expanded_dim)
    # Keep the [BLOCK_E, BLOCK_V] fp32 tile around 8k values (32 KiB of registers per program).
    block_v = max(16, min(triton.next_power_of_2(value_dim), 8192 // block_e))
    _taylor_step_kernel[(batch * heads,)](
        q_t, k_t, v_t, kv, k_sum, out, first, second, scale,
        heads, expanded_dim, value_dim, float(eps),
        *q_t.stride(), *k_t.stride(), *v_t.stride(), *kv.stride(), *k_sum.stride(), *out.stride(),
        BLOCK_E=block_e, BLOCK_V=block_v,
    )
    return out
