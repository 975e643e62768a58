"""Linear attention with a feature map (BASED's Taylor map by default).

Layout for every sequence tensor in this module: ``[B, T, H, D]`` (batch, time, heads, head dim);
q and k share the feature width ``f``, v has its own width ``Dv``. One-token tensors are ``[B, H, D]``.

    y_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + eps)     (causal)

Three forms that agree exactly in fp32:
- :func:`linear_attention_reference`: the quadratic T x T form, the test oracle;
- :func:`linear_attention`: the chunked O(T) form used by default (memory linear in T);
- :func:`linear_attention_step`: one token of the recurrence over the state
  ``kv = sum phi(k_j) (x) v_j`` [B, H, D', Dv] and ``k_sum = sum phi(k_j)`` [B, H, D'].
Half-precision inputs are computed with fp32 states and denominators; outputs keep the input dtype.
On CUDA tensors the causal Taylor case dispatches to flash-linear-attention's ``parallel_based``
when that package is installed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Union

import torch

from linmix.ops import dispatch
from linmix.ops.state import MixerState
from linmix.ops._checks import accumulation_dtype, require_positive_int, require_same, require_shape
from linmix.ops.feature_maps import taylor_feature_dim, taylor_feature_map, taylor_features_rows_first

FeatureMap = Union[str, Callable[[torch.Tensor], torch.Tensor]]
_TAYLOR_MAPS = {"taylor": True, "taylor_full": False}  # name -> symmetric
DEFAULT_EPS = 1e-12  # the official reference path's denominator eps


@dataclasses.dataclass
class LinearAttentionState(MixerState):
    """Recurrent state of linear attention, fp32 (or fp64): kv [B, H, D', Dv], k_sum [B, H, D']."""

    kv: torch.Tensor
    k_sum: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, feature_dim: int, value_dim: int, *, device=None, dtype=torch.float32):
        return cls(
            kv=torch.zeros(batch, heads, feature_dim, value_dim, device=device, dtype=dtype),
            k_sum=torch.zeros(batch, heads, feature_dim, device=device, dtype=dtype),
        )


def _resolve_feature_map(feature_map: FeatureMap) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(feature_map, str):
        if feature_map not in _TAYLOR_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(_TAYLOR_MAPS)} or a callable, got {feature_map!r}")
        return functools.partial(taylor_feature_map, symmetric=_TAYLOR_MAPS[feature_map])
    if not callable(feature_map):
        raise ValueError(f"feature_map must be one of {sorted(_TAYLOR_MAPS)} or a callable, got {type(feature_map).__name__}")
    return feature_map


def feature_dim_of(feature_map: FeatureMap, head_dim: int) -> int:
    """D' for a feature map applied to heads of width ``head_dim``."""
    if isinstance(feature_map, str) and feature_map in _TAYLOR_MAPS:
        return taylor_feature_dim(head_dim, symmetric=_TAYLOR_MAPS[feature_map])
    return _resolve_feature_map(feature_map)(torch.zeros(1, head_dim)).shape[-1]


def _check_qkv(q, k, v, key_padding_mask):
    layout = "[B, T, H, D]"
    require_shape("q", q, layout, 4)
    require_shape("k", k, layout, 4)
    require_shape("v", v, layout, 4)
    require_same("q, k, v", "[B, T, H]", q.shape[:3], k.shape[:3], v.shape[:3])
    require_same("q, k", "feature width D", q.shape[3:], k.shape[3:])
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
            raise ValueError(f"key_padding_mask must have shape [B, T] = {tuple(q.shape[:2])}, got {tuple(key_padding_mask.shape)}")


def _normalize(numerator_and_denominator: torch.Tensor, eps: float) -> torch.Tensor:
    """Split the augmented output [..., Dv + 1] into numerator / (denominator + eps)."""
    return numerator_and_denominator[..., :-1] / (numerator_and_denominator[..., -1:] + eps)


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: FeatureMap = "taylor",
    causal: bool = True,
    eps: float = DEFAULT_EPS,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quadratic form (the oracle): explicit T x T matrix of phi(q_i).phi(k_j). Shapes as the module."""
    _check_qkv(q, k, v, key_padding_mask)
    phi = _resolve_feature_map(feature_map)
    compute = accumulation_dtype(q.dtype)
    qf, kf, vf = (x.to(compute).transpose(1, 2) for x in (q, k, v))  # [B, H, T, .]
    scores = phi(qf) @ phi(kf).transpose(-1, -2)  # [B, H, T, T]
    length = q.shape[1]
    if causal:
        scores = scores * torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        scores = scores * key_padding_mask.to(q.device, torch.bool)[:, None, None, :]
    out = (scores @ vf) / (scores.sum(-1, keepdim=True) + eps)
    return out.transpose(1, 2).to(q.dtype)


def _fla_parallel_based():
    try:
        from fla.ops.based import parallel_based  # type: ignore
    except Exception:  # not installed, or no GPU driver
        return None
    return parallel_based


def _try_fla(q, k, v):
    """flash-linear-attention's Taylor kernel on CUDA, with scale and layout passed explicitly
    (its defaults changed between versions). Returns None when it cannot be used."""
    parallel_based = _fla_parallel_based()
    if parallel_based is None:
        return None
    kwargs = {"scale": q.shape[-1] ** -0.5, "use_norm": True}
    if "head_first" in inspect.signature(parallel_based).parameters:
        kwargs["head_first"] = False  # our layout is [B, T, H, D]
    return parallel_based(q, k, v, **kwargs)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: FeatureMap = "taylor",
    causal: bool = True,
    eps: float = DEFAULT_EPS,
    initial_state: LinearAttentionState | None = None,
    return_final_state: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
):
    """Linear attention, O(T) chunked form. q, k: [B, T, H, f]; v: [B, T, H, Dv] -> [B, T, H, Dv].

    Causal: within each chunk of ``chunk_size`` tokens the scores are computed directly (for the
    Taylor maps as ``1 + s + s^2/2`` from q.k, never forming phi(q) phi(k)^T over D'), and the
    earlier chunks enter through the running state ``sum phi(k)^T [v, 1]``, so memory is linear in
    T (constant apart from the output when gradients are off). Non-causal: every query sees every key (vision use); no state.

    ``initial_state`` continues a sequence; ``return_final_state=True`` returns ``(y, state)``.
    ``key_padding_mask: [B, T]`` (True = real token) keeps padded keys out of every sum and state.
    ``backend``: "auto" (fla kernel for eligible CUDA inputs, else torch), "torch" or "fla".
    """
    _check_qkv(q, k, v, key_padding_mask)
    require_positive_int("chunk_size", chunk_size)
    if backend not in ("auto", "torch", "fla"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'fla', got {backend!r}")
    if not causal and (initial_state is not None or return_final_state):
        raise ValueError("initial_state / return_final_state need causal=True (non-causal attention has no recurrent state)")
    fla_eligible = (
        q.is_cuda and causal and feature_map == "taylor" and initial_state is None
        and not return_final_state and key_padding_mask is None
    )
    if backend == "fla" and not fla_eligible:
        raise ValueError("backend='fla' needs CUDA tensors, causal=True, feature_map='taylor', and no state or mask")
    if backend != "torch" and fla_eligible:
        out = _try_fla(q, k, v)
        if out is not None:
            return out
        if backend == "fla":
            raise RuntimeError("backend='fla' requested but flash-linear-attention is not importable")

    phi = _resolve_feature_map(feature_map)
    taylor_symmetric = _TAYLOR_MAPS.get(feature_map) if isinstance(feature_map, str) else None
    batch, length, heads, f = q.shape
    value_dim = v.shape[-1]
    compute = accumulation_dtype(q.dtype)
    if initial_state is not None:
        compute = initial_state.kv.dtype if initial_state.kv.dtype == torch.float64 else compute
    qf, kf = (x.to(compute).transpose(1, 2) for x in (q, k))  # [B, H, T, f]
    # Augment v with a ones column: the last output column is then the denominator.
    vf = torch.cat([v.to(compute), v.new_ones(batch, length, heads, 1, dtype=compute)], dim=-1).transpose(1, 2)
    key_mask = None
    if key_padding_mask is not None:
        key_mask = key_padding_mask.to(q.device, compute)[:, None, :, None]  # [B, 1, T, 1]
        vf = vf * key_mask  # masked keys add nothing to numerator or denominator

    if not causal:
        phi_k = phi(kf)
        if key_mask is not None:
            phi_k = phi_k * key_mask
        out = phi(qf) @ (phi_k.transpose(-1, -2) @ vf)
        return _normalize(out, eps).transpose(1, 2).to(q.dtype)

    # Walk the sequence chunk by chunk with a running state: every intermediate is cache-sized,
    # which on CPU is several times faster than materialising phi(q), phi(k) and every chunk state
    # for the whole sequence (measured: docs/benchmarks.md). Batch and heads merge into one bmm
    # batch dim: [B*H, T, .].
    qf, kf, vf = (x.reshape(batch * heads, length, x.shape[-1]) for x in (qf, kf, vf))
    q_scaled = qf * (f ** -0.5)
    if taylor_symmetric is not None:
        # Feature-major copies [f, B*H, T]: Taylor features come from row gathers on them.
        q_rows, k_rows = qf.permute(2, 0, 1).contiguous(), kf.permute(2, 0, 1).contiguous()

        def features(rows: torch.Tensor, begin: int, end: int) -> torch.Tensor:
            return taylor_features_rows_first(rows[:, :, begin:end], taylor_symmetric).permute(1, 2, 0)
    else:
        q_rows, k_rows = qf, kf

        def features(rows: torch.Tensor, begin: int, end: int) -> torch.Tensor:
            return phi(rows[:, begin:end])
    if initial_state is not None:
        state = torch.cat([initial_state.kv, initial_state.k_sum.unsqueeze(-1)], dim=-1).to(compute)
        state = state.reshape(batch * heads, -1, value_dim + 1)
    else:
        state = qf.new_zeros(batch * heads, feature_dim_of(feature_map, f), value_dim + 1)
    outputs = []
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        phi_q, phi_k = features(q_rows, start, end), features(k_rows, start, end)  # [B*H, C, D']
        v_chunk = vf[:, start:end]  # masked keys have all-zero rows here
        if taylor_symmetric is not None:  # 1 + s + s^2/2 straight from q.k: f-wide, not D'-wide
            s = torch.bmm(q_scaled[:, start:end], kf[:, start:end].transpose(1, 2))
            scores = torch.addcmul(1.0 + s, s, s, value=0.5)
        else:
            scores = torch.bmm(phi_q, phi_k.transpose(1, 2))
        outputs.append(torch.baddbmm(torch.bmm(scores.tril(), v_chunk), phi_q, state))
        if key_mask is not None:
            phi_k = phi_k * v_chunk[..., -1:]  # the ones column is 0 for masked keys
        state = torch.baddbmm(state, phi_k.transpose(1, 2), v_chunk)
    state = state.reshape(batch, heads, -1, value_dim + 1)
    out = torch.cat(outputs, dim=1) if outputs else vf.new_zeros(batch * heads, 0, value_dim + 1)
    y = _normalize(out, eps).reshape(batch, heads, length, value_dim).transpose(1, 2).to(q.dtype)
    if not return_final_state:
        return y
    return y, LinearAttentionState(kv=state[..., :-1].contiguous(), k_sum=state[..., -1].contiguous())


def linear_attention_step(
    state: LinearAttentionState,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    *,
    feature_map: FeatureMap = "taylor",
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One causal token: q_t, k_t: [B, H, f]; v_t: [B, H, Dv] -> (y_t [B, H, Dv], state).

    ``S += phi(k_t) (x) v_t; z += phi(k_t); y_t = S^T phi(q_t) / (z . phi(q_t) + eps)``. The state is
    updated in place (fp32 accumulators) and returned.
    ``backend``: "auto" (the fused Triton kernel for CUDA tensors, Taylor maps and an fp32 state
    outside autograd; see :mod:`linmix.ops.dispatch`), "torch" or "triton".
    """
    layout = "[B, H, D]"
    require_shape("q_t", q_t, layout, 3)
    require_shape("k_t", k_t, layout, 3)
    require_shape("v_t", v_t, layout, 3)
    require_same("q_t, k_t, v_t", "[B, H]", q_t.shape[:2], k_t.shape[:2], v_t.shape[:2])
    expected_kv = (q_t.shape[0], q_t.shape[1], state.kv.shape[2], v_t.shape[-1])
    if tuple(state.kv.shape) != expected_kv:
        raise ValueError(f"state.kv must have shape [B, H, D', Dv] = {expected_kv}, got {tuple(state.kv.shape)}")
    dispatch.check_backend(backend, ("auto", "torch", "triton"))
    kernel_eligible = (isinstance(feature_map, str) and feature_map in _TAYLOR_MAPS and state.kv.dtype == torch.float32
                       and state.k_sum.dtype == torch.float32 and not dispatch.needs_autograd(q_t, k_t, v_t, state.kv))
    if dispatch.use_triton(backend, q_t, k_t, v_t, state.kv, state.k_sum, eligible=kernel_eligible,
                           why_not="feature_map 'taylor' or 'taylor_full', an fp32 state and no autograd"):
        from linmix.ops.triton.taylor_step import taylor_linear_attention_step

        y = taylor_linear_attention_step(state.kv, state.k_sum, q_t, k_t, v_t, symmetric=_TAYLOR_MAPS[feature_map], eps=eps)
        return y, state
    phi = _resolve_feature_map(feature_map)
    compute = state.kv.dtype
    phi_q = phi(q_t.to(compute))
    phi_k = phi(k_t.to(compute))
    if phi_k.shape[-1] != state.kv.shape[2]:
        raise ValueError(f"feature map gives D' = {phi_k.shape[-1]} but the state holds D' = {state.kv.shape[2]}")
    state.kv.add_(phi_k.unsqueeze(-1) * v_t.to(compute).unsqueeze(-2))
    state.k_sum.add_(phi_k)
    numerator = (phi_q.unsqueeze(-2) @ state.kv).squeeze(-2)
    denominator = (phi_q * state.k_sum).sum(-1, keepdim=True)
    return (numerator / (denominator + eps)).to(v_t.dtype), state
