"""WKV: the RWKV token mixing sum, bidirectional (Vision-RWKV) and causal (RWKV-4).

Layout: ``k, v: [B, T, C]`` (batch, time, channels); ``w, u: [C]`` (one decay and one bonus per
channel). One-token tensors are ``[B, C]``.

Bidirectional (Vision-RWKV's Bi-WKV, spec RWKV-SAM section 2). ``w`` and ``u`` are used as given:
the Vision-RWKV block passes ``w / T`` and ``u / T`` and applies no exp to ``w``, which may be
negative::

    y_t = [ sum_{i != t} exp(-(|t-i|-1) w + k_i) v_i + exp(u + k_t) v_t ]
        / [ sum_{i != t} exp(-(|t-i|-1) w + k_i)     + exp(u + k_t)     ]

Causal (RWKV-4, the causal half of the same sum). The RWKV-4 layer passes ``w = exp(time_decay) > 0``::

    y_t = [ sum_{i<t} exp(-(t-1-i) w + k_i) v_i + exp(u + k_t) v_t ]
        / [ sum_{i<t} exp(-(t-1-i) w + k_i)     + exp(u + k_t)     ]

Forms:

- :func:`bi_wkv_reference` / :func:`causal_wkv_reference`: the quadratic T x T forms in fp64 with a
  row-max-shifted softmax, the test oracles.
- :func:`bi_wkv`: the public O(T) op, choosing its backend (Triton on CUDA, the native C scan on
  CPU, else the torch forms of :mod:`linmix.ops.wkv_chunked`, which trace and export with a
  dynamic T).
- :func:`causal_wkv`: the chunked form for training and prefill (exact intra-chunk sums with a
  per-row max, a max-tracked state carried across chunks), with state in and out.
- :func:`causal_wkv_step`: one token of the recurrence over :class:`WKVState` (RWKV-4's
  numerically stable numerator ``a``, denominator ``b`` and running exponent ``p``).

Half-precision inputs are computed in fp32 (fp64 stays fp64); outputs keep the input dtype. Keys may
be ``-inf`` (masked or padded positions): they contribute nothing, and no NaN is produced even where
a row has no key at all (such outputs are 0).
"""

from __future__ import annotations

import dataclasses

import torch

from linmix.ops import dispatch, native
from linmix.ops._checks import (
    accumulation_dtype,
    require_positive_int,
    require_same,
    require_shape,
    tracing_or_exporting,
)
from linmix.ops.state import MixerState
from linmix.ops._wkv_numerics import EMPTY_EXPONENT, NEG_INF, finite_or_zero, safe_divide
from linmix.ops.wkv_chunked import BI_WKV_FORMS, bi_wkv_torch
from linmix.ops.wkv_one_shift import one_shift_applicable


@dataclasses.dataclass
class WKVState(MixerState):
    """Causal WKV state, per (batch, channel), fp32 (fp64 for fp64 inputs).

    ``exp(p) * a`` and ``exp(p) * b`` are the numerator and denominator sums
    ``sum_{i<t} exp(-(t-1-i) w + k_i) (v_i, 1)`` as seen by the next token ``t``; ``p`` is the
    running max exponent that keeps ``a`` and ``b`` in range (RWKV-4's stable form).
    Shapes: a, b, p: [B, C]. The empty state is ``a = b = 0``, ``p = -1e38``.
    """

    a: torch.Tensor
    b: torch.Tensor
    p: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, channels: int, *, device=None, dtype=torch.float32) -> "WKVState":
        return cls(
            a=torch.zeros(batch_size, channels, device=device, dtype=dtype),
            b=torch.zeros(batch_size, channels, device=device, dtype=dtype),
            p=torch.full((batch_size, channels), EMPTY_EXPONENT, device=device, dtype=dtype),
        )


# --------------------------------------------------------------------------------------------------
# validation and small helpers


def _check_wkv_inputs(w, u, k, v) -> None:
    require_shape("k", k, "[B, T, C]", 3)
    require_shape("v", v, "[B, T, C]", 3)
    require_same("k, v", "shape [B, T, C]", tuple(k.shape), tuple(v.shape))
    channels = k.shape[-1]
    for name, tensor in (("w", w), ("u", u)):
        require_shape(name, tensor, f"[C] = [{channels}]", 1)
        if tensor.shape[0] != channels:
            raise ValueError(
                f"{name} must have shape [C] = [{channels}] (C from k, v: [B, T, C] = {tuple(k.shape)}), "
                f"got shape {tuple(tensor.shape)}"
            )


def _check_state(state, batch: int, channels: int) -> None:
    if not isinstance(state, WKVState):
        raise ValueError(f"state must be a WKVState (a, b, p of shape [B, C] = [{batch}, {channels}]), got {type(state).__name__}")
    for name in ("a", "b", "p"):
        tensor = getattr(state, name)
        require_shape(f"state.{name}", tensor, f"[B, C] = [{batch}, {channels}]", 2)
        if tuple(tensor.shape) != (batch, channels):
            raise ValueError(f"state.{name} must have shape [B, C] = [{batch}, {channels}], got {tuple(tensor.shape)}")


def _compute_dtypes(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    out_dtype = torch.promote_types(k.dtype, v.dtype)
    return out_dtype, accumulation_dtype(out_dtype)


# --------------------------------------------------------------------------------------------------
# bidirectional WKV


def _row_blocks(rows: int, row_elements: int, budget: int = 1 << 22):
    block = max(1, budget // max(1, row_elements))
    for start in range(0, rows, block):
        yield start, min(rows, start + block)


def _softmax_rows(exponent: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_i softmax_i(exponent[..., i, :]) v_i over dim -2, row-max shifted; rows with no term give 0."""
    shift = finite_or_zero(exponent.amax(dim=-2, keepdim=True)).detach()
    weights = torch.exp(exponent - shift)
    return safe_divide((weights * v).sum(dim=-2), weights.sum(dim=-2))


def bi_wkv_reference(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional WKV by the quadratic formula in fp64 (the oracle). w, u: [C]; k, v: [B, T, C] -> [B, T, C].

    Rows are processed in blocks to bound memory (the whole form is O(T^2 C) time); differentiable.
    """
    _check_wkv_inputs(w, u, k, v)
    out_dtype, _ = _compute_dtypes(k, v)
    w, u, k, v = (t.to(torch.float64) for t in (w, u, k, v))
    batch, length, channels = k.shape
    positions = torch.arange(length, device=k.device)
    outputs = []
    for start, stop in _row_blocks(length, batch * length * channels):
        rows = positions[start:stop]
        distance = (rows[:, None] - positions[None, :]).abs().to(torch.float64)  # [R, T]
        exponent = -(distance[..., None] - 1) * w + k[:, None, :, :]  # [B, R, T, C]
        diagonal = (rows[:, None] == positions[None, :])[None, :, :, None]
        exponent = torch.where(diagonal, (u + k)[:, None, :, :], exponent)
        outputs.append(_softmax_rows(exponent, v[:, None, :, :]))
    return torch.cat(outputs, dim=1).to(out_dtype)


def _use_native(backend: str, form: str, w, u, k, v) -> bool:
    """Whether :func:`bi_wkv` runs the C scan kernel (``w, u, k, v`` already in the compute dtype)."""
    if backend == "torch" or form != "auto" or (backend == "auto" and (tracing_or_exporting(w, u, k, v) or dispatch.reference_forced())):
        return False  # traced / compiled graphs never call the ctypes kernel
    reasons = native.ineligible(w, u, k, v)
    if not reasons and not one_shift_applicable(w, u, k.shape[1]):
        reasons.append("(T - 1) max|w| <= 20 and max|u| <= 60")
    if backend == "native":
        if reasons:
            raise ValueError("backend='native' needs " + ", ".join(reasons))
        if not native.available():
            raise RuntimeError(f"backend='native' requested but the native CPU kernels are unavailable: {native.unavailable_reason()}")
        return True
    return not reasons and native.available()


def native_bi_wkv_applies(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``bi_wkv(w, u, k, v)`` (backend and form "auto") runs the native C kernel on these
    fp32 inputs; for callers that fuse more into that kernel (the receptance gate of Vision-RWKV)."""
    return _use_native("auto", "auto", w, u, k, v)


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64,
           backend: str = "auto", form: str = "auto") -> torch.Tensor:
    """Bidirectional WKV in O(T): w, u: [C]; k, v: [B, T, C] -> [B, T, C] (see the module docstring).

    ``form`` (torch backend): "one_shift" is :func:`linmix.ops.wkv_one_shift.bi_wkv_one_shift`, about
    4x faster on CPU, exact while ``(T - 1) max|w| <= 20`` (always so for Vision-RWKV's ``w / T``
    with a raw decay up to 20); "chunked" is :func:`linmix.ops.wkv_chunked.bi_wkv_chunked`, exact
    for any decay given a small enough ``chunk_size`` and free of data-dependent Python control
    flow, so it is what export, tracing and torch.compile use; "auto" picks one-shift where it is
    exact and not tracing, chunked otherwise.

    ``backend``: "auto" (the Triton kernel of :mod:`linmix.ops.triton.bi_wkv` for CUDA tensors, see
    :mod:`linmix.ops.dispatch`; for fp32 / half CPU inputs outside autograd and tracing, the C scan
    kernel of :mod:`linmix.ops.native` where it builds and one-shift is exact; the torch forms while
    tracing, exporting or compiling), "torch" (:func:`linmix.ops.wkv_chunked.bi_wkv_torch`),
    "triton" or "native" (forced; an error where it cannot run).

    Written with prefix / suffix sums only (cumsum, exp, max, where, no loop over time), so it is
    differentiable by autograd and exports to ONNX with a dynamic T.

    Numerics, memory and export: see :func:`linmix.ops.wkv_chunked.bi_wkv_chunked`.
    """
    _check_wkv_inputs(w, u, k, v)
    require_positive_int("chunk_size", chunk_size)
    dispatch.check_backend(backend, ("auto", "torch", "triton", "native"))
    eligible = torch.promote_types(k.dtype, v.dtype) != torch.float64  # fp64 stays on the torch path
    if backend != "native" and dispatch.use_triton(backend, w, u, k, v, eligible=eligible, why_not="fp32 or half-precision inputs"):
        from linmix.ops.triton.bi_wkv import bi_wkv_triton

        return bi_wkv_triton(w, u, k, v, chunk_size=chunk_size)
    if form not in BI_WKV_FORMS:
        raise ValueError(f"form must be one of {BI_WKV_FORMS}, got {form!r}")
    out_dtype, dtype = _compute_dtypes(k, v)
    computed = [t.to(dtype) for t in (w, u, k, v)]
    if _use_native(backend, form, *computed):
        return native.bi_wkv_native(*computed).to(out_dtype)
    return bi_wkv_torch(*computed, chunk_size=chunk_size, form=form).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# causal WKV


def causal_wkv_reference(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal WKV by the quadratic formula in fp64 (the oracle). w, u: [C]; k, v: [B, T, C] -> [B, T, C]."""
    _check_wkv_inputs(w, u, k, v)
    out_dtype, _ = _compute_dtypes(k, v)
    w, u, k, v = (t.to(torch.float64) for t in (w, u, k, v))
    batch, length, channels = k.shape
    positions = torch.arange(length, device=k.device)
    outputs = []
    for start, stop in _row_blocks(length, batch * length * channels):
        rows = positions[start:stop]
        distance = (rows[:, None] - 1 - positions[None, :]).to(torch.float64)  # t - 1 - i, [R, T]
        exponent = -distance[..., None] * w + k[:, None, :, :]  # [B, R, T, C]
        diagonal = (rows[:, None] == positions[None, :])[None, :, :, None]
        future = (positions[None, :] > rows[:, None])[None, :, :, None]
        exponent = torch.where(diagonal, (u + k)[:, None, :, :], exponent)
        exponent = torch.where(future, torch.full_like(exponent, NEG_INF), exponent)
        outputs.append(_softmax_rows(exponent, v[:, None, :, :]))
    return torch.cat(outputs, dim=1).to(out_dtype)


def causal_wkv(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState | None = None,
    return_state: bool = False,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int = 16,
):
    """Causal WKV over a whole sequence, chunked. w, u: [C]; k, v: [B, T, C] -> y [B, T, C].

    ``state`` (a :class:`WKVState`) continues from a previous call; with ``return_state=True`` the
    result is ``(y, final_state)``. ``mask: [B, T]`` (bool, True = real token) removes tokens
    entirely: a masked token contributes nothing and does not count as a time step for the decay,
    so a left-padded (or holed) row gives exactly the outputs and state of its real tokens alone.
    Without ``mask``, a ``-inf`` key also contributes nothing but still counts as a step.

    Inside each chunk of ``chunk_size`` tokens the sums are the quadratic form with a per-row max
    (exact for any w, k); the state crosses chunk borders in RWKV-4's max-tracked form. The loop
    over chunks runs T / chunk_size times; memory for autograd is O(B T chunk_size C).
    """
    _check_wkv_inputs(w, u, k, v)
    require_positive_int("chunk_size", chunk_size)
    batch, length, channels = k.shape
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape [B, T] = {(batch, length)}, got {shape}")
        mask = mask.to(device=k.device, dtype=torch.bool)
    if state is not None:
        _check_state(state, batch, channels)
    out_dtype, dtype = _compute_dtypes(k, v)
    w, u, k, v = (t.to(dtype) for t in (w, u, k, v))
    if mask is not None:
        k = k.masked_fill(~mask[..., None], NEG_INF)
    if state is None:
        state = WKVState.empty(batch, channels, device=k.device, dtype=dtype)
    a, b, p = (t.to(dtype) for t in (state.a, state.b, state.p))
    p = p.detach()  # a shift, not a value: exp(p) * (a, b) is the state

    outputs = []
    for start in range(0, length, chunk_size):
        k_chunk = k[:, start : start + chunk_size]  # [B, n, C]
        v_chunk = v[:, start : start + chunk_size]
        n = k_chunk.shape[1]
        if mask is None:
            time = torch.arange(n, device=k.device, dtype=dtype)[None, :]  # [1, n] steps since chunk start
            steps = torch.full((1, 1), float(n), device=k.device, dtype=dtype)
        else:
            real = mask[:, start : start + n].to(dtype)
            time = torch.cumsum(real, dim=1) - real  # real tokens before each position, [B, n]
            steps = real.sum(dim=1, keepdim=True)  # [B, 1]
        # Exponents of key j' for query j: k_j' - (time_j - 1 - time_j') w below the diagonal,
        # u + k_j on it, nothing above; the incoming state enters with p - time_j w.
        distance = time[:, :, None] - 1 - time[:, None, :]  # [B|1, n(query), n(key)]
        exponent = k_chunk[:, None, :, :] - distance[..., None] * w  # [B, n, n, C]
        query = torch.arange(n, device=k.device)
        below = (query[None, :] < query[:, None])[None, :, :, None]
        diagonal = (query[None, :] == query[:, None])[None, :, :, None]
        exponent = torch.where(below, exponent, torch.full_like(exponent, NEG_INF))
        exponent = torch.where(diagonal, (u + k_chunk)[:, None, :, :], exponent)
        state_exponent = p[:, None, :] - time[..., None] * w  # [B, n, C]
        row_max = torch.maximum(exponent.amax(dim=2), state_exponent).detach()  # finite (p >= -1e38)
        weights = torch.exp(exponent - row_max[:, :, None, :])
        state_weight = torch.exp(state_exponent - row_max)
        numerator = (weights * v_chunk[:, None, :, :]).sum(dim=2) + state_weight * a[:, None, :]
        denominator = weights.sum(dim=2) + state_weight * b[:, None, :]
        outputs.append(safe_divide(numerator, denominator))

        # State seen by the first token after the chunk.
        key_exponent = k_chunk - (steps - 1 - time)[..., None] * w  # [B, n, C]
        decayed = p - steps * w  # [B, C]
        new_p = torch.maximum(decayed, key_exponent.amax(dim=1)).detach()
        carry = torch.exp(decayed - new_p)
        fresh = torch.exp(key_exponent - new_p[:, None, :])
        a = carry * a + (fresh * v_chunk).sum(dim=1)
        b = carry * b + fresh.sum(dim=1)
        p = new_p

    if outputs:
        y = torch.cat(outputs, dim=1).to(out_dtype)
    else:
        y = torch.zeros(batch, 0, channels, device=k.device, dtype=out_dtype)
    if return_state:
        return y, WKVState(a=a, b=b, p=p)
    return y


def causal_wkv_step(
    state: WKVState, w: torch.Tensor, u: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor
) -> tuple[torch.Tensor, WKVState]:
    """One token of causal WKV: k_t, v_t: [B, C] -> (y_t [B, C], state).

    RWKV-4's stable recurrence. With autograd off (decode) the state's tensors are updated in place;
    with it on, the returned state holds new tensors (other fields are kept). Always use the
    returned state.
    """
    require_shape("k_t", k_t, "[B, C]", 2)
    require_shape("v_t", v_t, "[B, C]", 2)
    require_same("k_t, v_t", "shape [B, C]", tuple(k_t.shape), tuple(v_t.shape))
    batch, channels = k_t.shape
    for name, tensor in (("w", w), ("u", u)):
        require_shape(name, tensor, f"[C] = [{channels}]", 1)
        if tensor.shape[0] != channels:
            raise ValueError(f"{name} must have shape [C] = [{channels}] (C from k_t: [B, C] = {tuple(k_t.shape)}), got shape {tuple(tensor.shape)}")
    _check_state(state, batch, channels)
    out_dtype = torch.promote_types(k_t.dtype, v_t.dtype)
    dtype = state.a.dtype
    w, u, k_t, v_t = (t.to(dtype) for t in (w, u, k_t, v_t))
    a, b, p = state.a, state.b, state.p

    # Shifts are detached: exp(p) (a, b) is the value, p only keeps a and b in range; the decay's
    # gradient must flow through exp(p - w - new_p), not vanish into a max.
    p = p.detach()
    bonus = u + k_t
    shift = torch.maximum(p, bonus).detach()
    old_weight, new_weight = torch.exp(p - shift), torch.exp(bonus - shift)
    y_t = safe_divide(old_weight * a + new_weight * v_t, old_weight * b + new_weight)

    decayed = p - w
    new_p = torch.maximum(decayed, k_t).detach()
    carry, fresh = torch.exp(decayed - new_p), torch.exp(k_t - new_p)
    new_a = carry * a + fresh * v_t
    new_b = carry * b + fresh
    if torch.is_grad_enabled():  # new tensors: the old ones may be saved for backward
        state = dataclasses.replace(state, a=new_a, b=new_b, p=new_p)
    else:
        state.a.copy_(new_a)
        state.b.copy_(new_b)
        state.p.copy_(new_p)
    return y_t.to(out_dtype), state
