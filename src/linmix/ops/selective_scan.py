"""Mamba-1 selective scan (S6): the reference, a chunked PyTorch fast path, a native C scan with its
backward for fp32 CPU training and inference (:mod:`linmix.ops.selective_scan_native`, chosen by
:func:`selective_scan`'s ``backend="auto"``), and a one-token step; and :func:`cross_scan_selective_scan`, K scans over one 2D token grid in different orders, summed
(VMamba's cross-scan, Vim's bidirectional scan), with a native C kernel for CPU inference and a
Triton kernel for CUDA (see its docstring and the section at the end of this file).

Layout (one layout for the whole family; D = inner channels, N = state size per channel):

- ``u, delta: [B, T, D]``: the input and the step sizes
- ``A: [D, N]``: the (real, in practice negative) diagonal state matrix
- ``B, C: [B, T, N]``: input-dependent projections, shared by all D channels
- ``D: [D]`` optional skip, ``z: [B, T, D]`` optional gate, ``delta_bias: [D]`` optional
- state ``h: [B, D, N]``

Math, per token t (``delta`` first gets ``+ delta_bias`` and, with ``delta_softplus``, a softplus)::

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * u_t) * B_t
    y_t = <h_t, C_t> + D * u_t            (the sum over N)
    y_t = y_t * silu(z_t)                  (when z is given)

Half-precision inputs are computed in fp32 (fp64 inputs in fp64); ``y`` comes back in ``u.dtype``
and the final state in the compute dtype (fp32 for fp32/bf16/fp16 inputs).

Why the fast path is a two-level recurrence rather than a segment-sum matrix: in Mamba-1 the decay
``exp(delta_t[d] * A[d, n])`` differs for every (d, n) pair, so the within-chunk decay matrix
``exp(cumsum_i - cumsum_j)`` is ``[L, L, D, N]`` per chunk and costs ``L`` times the work of the
scan itself (it cannot be turned into a matmul as in Mamba-2, whose decay is a scalar per head).
Measured on CPU it was 2.5-10x slower than the scheme below (L = 4..16). Instead
:func:`selective_scan` cuts T into chunks of L tokens and

1. runs the recurrence from a zero state *inside* all chunks at once (L steps, each a vectorised
   update of every chunk's ``[B, D, N]`` state), collecting the intra-chunk outputs;
2. carries the true state across chunk boundaries (T / L small steps), using the chunk decay
   ``exp(A * sum(delta over the chunk))``;
3. adds each chunk's carried-in contribution ``<exp(A * cumsum(delta)_t) * h_start, C_t>``, where
   the cumulative sum starts at the chunk boundary (a difference of cumulative log-decays formed
   before the exp, so every exponent is <= 0 when A < 0 and delta > 0 and nothing can overflow).

That is O(T * D * N) work, the same arithmetic as the reference, in about 2 * L + T / L Python
steps instead of T (L defaults to about sqrt(T / 2)). The gain is the per-step overhead: at T = 2048,
D = 256, N = 16 it is about 2-3x faster than the reference on one CPU thread and 4-10x with two
threads, and the step count is what bounds kernel launches on a GPU. Exact up to float rounding and
differentiable by autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from linmix.ops import dispatch, native
from linmix.ops.selective_scan_native import native_scan

from linmix.ops.selective_scan_torch import (
    BIDIRECTIONAL_DIRECTIONS,
    CROSS_SCAN_DIRECTIONS,
    SCAN_DIRECTIONS,
    _check_directions,
    _chunked_scan,
    _compute_dtype,
    _cross_scan_torch,
    _default_chunk_size,
    _prepare_delta,
    from_scan_order,
    scan_order_table,
    to_scan_order,
)

from ._checks import require_positive_int, require_shape, tracing_or_exporting

__all__ = [
    "BIDIRECTIONAL_DIRECTIONS", "CROSS_SCAN_DIRECTIONS", "SCAN_DIRECTIONS", "cross_scan_selective_scan",
    "cross_scan_selective_scan_reference", "from_scan_order", "native_cross_scan_applies", "native_scan_applies", "scan_order_table", "selective_scan",
    "selective_scan_reference", "selective_scan_step", "to_scan_order",
]



def _require_size(name: str, tensor: torch.Tensor, layout: str, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(tensor.shape)}")


def _check_sequence_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> tuple[int, int, int, int]:
    """Validate the [B, T, D] layout and return (batch, length, channels, state_size)."""
    require_shape("u", u, "[B, T, D]", 3)
    require_shape("A", A, "[D, N]", 2)
    batch, length, channels = u.shape
    state_size = A.shape[1]
    sizes = {"[B, T, D]": (batch, length, channels), "[D, N]": (channels, state_size), "[B, T, N]": (batch, length, state_size),
             "[D]": (channels,), "[B, D, N]": (batch, channels, state_size)}
    for name, tensor, layout in (("delta", delta, "[B, T, D]"), ("A", A, "[D, N]"), ("B", B, "[B, T, N]"), ("C", C, "[B, T, N]"),
                                 ("D", D, "[D]"), ("z", z, "[B, T, D]"), ("delta_bias", delta_bias, "[D]"),
                                 ("initial_state", initial_state, "[B, D, N]")):
        if tensor is None:
            continue
        require_shape(name, tensor, layout, len(sizes[layout]))
        _require_size(name, tensor, f"{layout} (u: [B, T, D], A: [D, N])", sizes[layout])
    return batch, length, channels, state_size


def _finish_output(y, u, D, z, dtype):
    """y + D * u, then the silu(z) gate; all in the compute dtype."""
    if D is not None:
        y = y + u * D.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """The test oracle: a plain token-by-token loop (see the module docstring for layout and math).

    Computed in fp32 (fp64 if any input is fp64: pass fp64 inputs for a tight oracle).
    Returns ``y: [B, T, D]`` in ``u.dtype``, and with ``return_final_state=True`` also the final
    state ``h: [B, D, N]`` in the compute dtype.
    """
    batch, length, channels, state_size = _check_sequence_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out_dtype = u.dtype
    u, A, B, C = (t.to(dtype) for t in (u, A, B, C))
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    if initial_state is None:
        h = u.new_zeros(batch, channels, state_size)
    else:
        h = initial_state.to(dtype)
    outputs = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)
        h = decay * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        outputs.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(outputs, dim=1) if outputs else u.new_zeros(batch, 0, channels)
    y = _finish_output(y, u, D, z, dtype).to(out_dtype)
    return (y, h) if return_final_state else y


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int | None = None,
    *,
    backend: str = "auto",
):
    """Selective scan for training and prefill: the native C scan with its backward for fp32 CPU
    tensors, else the chunked torch recurrence (any device).

    Args:
        u, delta: ``[B, T, D]``; A: ``[D, N]``; B, C: ``[B, T, N]``.
        D: ``[D]`` skip weight; z: ``[B, T, D]`` gate (``y * silu(z)``); delta_bias: ``[D]``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        initial_state: ``[B, D, N]`` state to continue from (default zeros).
        return_final_state: also return the final state ``[B, D, N]``.
        chunk_size: tokens per chunk L of the torch path (default about sqrt(T / 2), a power of
            two); any positive value gives the same result up to rounding, T need not be a multiple of it.
        backend: "auto" (the native C scan, :mod:`linmix.ops.selective_scan_native`, where
            :func:`native_scan_applies`: fp32 compute on CPU, eager mode, ``A <= 0``, step sizes
            ``>= 0``, ``LINMIX_FORCE_REFERENCE`` unset, the kernels built; differentiable, so also
            for training; else torch), "torch" (the chunked recurrence) or "native" (forced; an
            error where it cannot run). The skip, gate, bias and softplus are torch ops either way.

    Returns:
        ``y: [B, T, D]`` in ``u.dtype``; with ``return_final_state`` the tuple ``(y, h)`` with
        ``h: [B, D, N]`` in the compute dtype (fp32 unless an input is fp64).
    """
    batch, length, channels, state_size = _check_sequence_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dispatch.check_backend(backend, ("auto", "torch", "native"))
    if chunk_size is not None:
        require_positive_int("chunk_size", chunk_size)
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out_dtype = u.dtype
    u, A, B, C = (t.to(dtype) for t in (u, A, B, C))
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    state = None if initial_state is None else initial_state.to(dtype)

    if length == 0:
        y = u.new_zeros(batch, 0, channels).to(out_dtype)
        if state is None:
            state = u.new_zeros(batch, channels, state_size)
        return (y, state) if return_final_state else y

    if _use_native_scan(backend, u, delta, A, B, C, state, delta_softplus):
        y, final = native_scan(u, delta, A, B, C, state)
    else:
        y, final = _chunked_scan(u, delta, A, B, C, state, chunk_size or _default_chunk_size(length))
    y = _finish_output(y, u, D, z, dtype).to(out_dtype)
    return (y, final) if return_final_state else y


def _native_scan_reasons(u, delta, A, B, C, initial_state, delta_softplus: bool) -> list[str]:
    """What the inputs (after the bias and softplus, in the compute dtype) lack for the native scan."""
    tensors = [t for t in (u, delta, A, B, C, initial_state) if t is not None]
    reasons = native.ineligible(*tensors, differentiable=True)
    if reasons:
        return reasons
    # The kernel's exponential is for non-positive arguments: delta * A <= 0.
    if not bool((A <= 0).all()):
        reasons.append("A <= 0")
    if not delta_softplus and not bool((delta >= 0).all()):
        reasons.append("delta + delta_bias >= 0 (or delta_softplus=True)")
    return reasons


def native_scan_applies(u, delta, A, B, C, initial_state=None, *, delta_softplus: bool = False) -> bool:
    """Whether :func:`selective_scan` (``backend="auto"``) runs the native C scan on these inputs
    (``delta`` after its bias and softplus, all in the compute dtype): fp32 CPU tensors, eager mode
    (not tracing, exporting or compiling), ``A <= 0``, ``delta >= 0``, ``LINMIX_FORCE_REFERENCE``
    unset and the kernels built. Autograd may record: the native scan has a backward."""
    tensors = [t for t in (u, delta, A, B, C, initial_state) if t is not None]
    if tracing_or_exporting(*tensors) or dispatch.reference_forced():
        return False
    return not _native_scan_reasons(u, delta, A, B, C, initial_state, delta_softplus) and native.available()


def _use_native_scan(backend, u, delta, A, B, C, initial_state, delta_softplus) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        return native_scan_applies(u, delta, A, B, C, initial_state, delta_softplus=delta_softplus)
    reasons = _native_scan_reasons(u, delta, A, B, C, initial_state, delta_softplus)
    if reasons:
        raise ValueError("backend='native' needs " + ", ".join(reasons))
    if not native.available():
        raise RuntimeError("backend='native' requested but the native CPU kernels are unavailable: " + native.unavailable_reason())
    return True


def selective_scan_step(
    state: torch.Tensor,
    u_t: torch.Tensor,
    delta_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    D: torch.Tensor | None = None,
    z_t: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the scan, updating ``state`` in place.

    Args:
        state: ``[B, D, N]`` fp32 (or fp64) state, overwritten with the new state.
        u_t, delta_t: ``[B, D]``; A: ``[D, N]``; B_t, C_t: ``[B, N]``; D, delta_bias: ``[D]``;
        z_t: ``[B, D]``.

    Returns:
        ``(y_t, state)``: ``y_t: [B, D]`` in ``u_t.dtype`` and the same ``state`` object.
    """
    require_shape("state", state, "[B, D, N]", 3)
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be fp32 or fp64 (shape [B, D, N]), got dtype {state.dtype}")
    batch, channels, state_size = state.shape
    sizes = {"[B, D]": (batch, channels), "[D, N]": (channels, state_size), "[B, N]": (batch, state_size), "[D]": (channels,)}
    for name, tensor, layout in (("u_t", u_t, "[B, D]"), ("delta_t", delta_t, "[B, D]"), ("A", A, "[D, N]"), ("B_t", B_t, "[B, N]"),
                                 ("C_t", C_t, "[B, N]"), ("D", D, "[D]"), ("z_t", z_t, "[B, D]"), ("delta_bias", delta_bias, "[D]")):
        if tensor is None:
            continue
        require_shape(name, tensor, layout, len(sizes[layout]))
        _require_size(name, tensor, f"{layout} (state: [B, D, N])", sizes[layout])

    dtype = state.dtype
    out_dtype = u_t.dtype
    u = u_t.to(dtype)
    delta = _prepare_delta(delta_t, delta_bias, delta_softplus, dtype)
    decay = torch.exp(delta[:, :, None] * A.to(dtype))
    state.mul_(decay).addcmul_((delta * u)[:, :, None], B_t.to(dtype)[:, None, :])
    y = torch.matmul(state, C_t.to(dtype)[:, :, None]).squeeze(-1)
    y = _finish_output(y, u, D, z_t, dtype).to(out_dtype)
    return y, state


# --------------------------------------------------------------------------------------------------
# several scan directions over one 2D token grid (VMamba's cross-scan, Vim's bidirectional scan)

# (the scan orders and the torch forms live in linmix.ops.selective_scan_torch)


def _check_cross_inputs(u, delta, A, B, C, D, delta_bias, height, width, directions) -> tuple[int, int, int, int, int]:
    """Validate the cross-scan layout; return (batch, length, channels, state_size, number of directions)."""
    require_shape("u", u, "[B, T, D]", 3)
    require_shape("A", A, "[K, D, N]", 3)
    batch, length, channels = u.shape
    count, state_size = len(directions), A.shape[2]
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if height * width != length:
        raise ValueError(f"u must have shape [B, T, D] with T = height * width = {height} * {width}, got {tuple(u.shape)}")
    sizes = {"[B, K, T, D]": (batch, count, length, channels), "[K, D, N]": (count, channels, state_size),
             "[B, K, T, N]": (batch, count, length, state_size), "[K, D]": (count, channels)}
    for name, tensor, layout in (("delta", delta, "[B, K, T, D]"), ("A", A, "[K, D, N]"), ("B", B, "[B, K, T, N]"),
                                 ("C", C, "[B, K, T, N]"), ("D", D, "[K, D]"), ("delta_bias", delta_bias, "[K, D]")):
        if tensor is None:
            continue
        require_shape(name, tensor, layout, len(sizes[layout]))
        _require_size(name, tensor, f"{layout} (u: [B, T, D], K = {count} directions, A: [K, D, N])", sizes[layout])
    return batch, length, channels, state_size, count


def _delta_parts(delta) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``delta`` or the low-rank pair ``(dt_low [B, K, T, R], dt_weight [K, D, R])`` -> (delta, dt_low, dt_weight)."""
    if isinstance(delta, (tuple, list)):
        if len(delta) != 2 or not all(isinstance(t, torch.Tensor) for t in delta):
            raise ValueError("delta must be a tensor [B, K, T, D] or a pair (dt_low [B, K, T, R], dt_weight [K, D, R])")
        return None, delta[0], delta[1]
    return delta, None, None


def _check_low_rank(dt_low, dt_weight, batch, count, length, channels) -> None:
    require_shape("dt_low", dt_low, "[B, K, T, R]", 4)
    require_shape("dt_weight", dt_weight, "[K, D, R]", 3)
    rank = dt_weight.shape[2]
    _require_size("dt_low", dt_low, "[B, K, T, R] (u: [B, T, D], dt_weight: [K, D, R])", (batch, count, length, rank))
    _require_size("dt_weight", dt_weight, "[K, D, R] (u: [B, T, D], K directions)", (count, channels, rank))


def _full_delta(delta, dt_low, dt_weight) -> torch.Tensor:
    return delta if dt_low is None else torch.einsum("bktr,kdr->bktd", dt_low, dt_weight)


def cross_scan_selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    *,
    height: int,
    width: int,
    directions=CROSS_SCAN_DIRECTIONS,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The oracle of :func:`cross_scan_selective_scan`: per direction, permute the inputs into scan
    order, run :func:`selective_scan_reference`, permute back; sum over directions. ``delta`` may be
    the low-rank pair, as in :func:`cross_scan_selective_scan`."""
    directions = _check_directions(directions)
    delta, dt_low, dt_weight = _delta_parts(delta)
    batch, length, channels, _, count = _check_cross_inputs(u, delta, A, B, C, D, delta_bias, height, width, directions)
    if dt_low is not None:
        _check_low_rank(dt_low, dt_weight, batch, count, length, channels)
        delta = _full_delta(delta, dt_low, dt_weight)
    dtype = _compute_dtype(u, delta, A, B, C, D, delta_bias)
    y = None
    for k, direction in enumerate(directions):
        order = functools.partial(to_scan_order, direction=direction, height=height, width=width)
        y_k = selective_scan_reference(order(u.to(dtype)), order(delta[:, k]), A[k], order(B[:, k]), order(C[:, k]),
                                       None if D is None else D[k].to(dtype),
                                       delta_bias=None if delta_bias is None else delta_bias[k], delta_softplus=delta_softplus)
        y_k = from_scan_order(y_k, direction, height, width)
        y = y_k if y is None else y + y_k
    return y.to(u.dtype)


def _native_value_reasons(delta, A, delta_bias, delta_softplus) -> list[str]:
    """The kernel's exponential is for non-positive arguments: it needs ``A <= 0`` (Mamba's
    ``A = -exp(A_log)``) and step sizes >= 0 (always so after softplus)."""
    reasons = [] if bool((A <= 0).all()) else ["A <= 0"]
    if not delta_softplus:
        steps = _full_delta(*_delta_parts(delta))
        if not bool(((steps if delta_bias is None else steps + delta_bias[:, None]) >= 0).all()):
            reasons.append("delta + delta_bias >= 0 (or delta_softplus=True)")
    return reasons


def native_cross_scan_applies(u, delta, A, B, C, D=None, delta_bias=None, *, delta_softplus: bool = True) -> bool:
    """Whether ``cross_scan_selective_scan(..., backend="auto")`` runs the native C kernel on these
    inputs: fp32 CPU, no autograd, not tracing, LINMIX_FORCE_REFERENCE unset, the kernels built,
    ``A <= 0`` and non-negative step sizes."""
    tensors = [t for t in (u, *(delta if isinstance(delta, (tuple, list)) else (delta,)), A, B, C, D, delta_bias) if t is not None]
    return native.usable(*tensors) and not _native_value_reasons(delta, A, delta_bias, delta_softplus)


def cross_scan_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    *,
    height: int,
    width: int,
    directions=CROSS_SCAN_DIRECTIONS,
    delta_softplus: bool = False,
    backend: str = "auto",
    form: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """K selective scans over one ``height x width`` token grid in K orders, summed: VMamba's
    cross-scan + S6 + cross-merge in one call.

    Every tensor stays in row-major GRID order; the scan order is the kernel's business, so no
    permuted copy of the map is made on the native and Triton paths.

    Args:
        u: ``[B, T, D]`` with ``T = height * width``, row-major (token ``h * width + w``): the input
            shared by all directions.
        delta: ``[B, K, T, D]``: direction k's step size at grid token t (not at scan step t); or the
            pair ``(dt_low [B, K, T, R], dt_weight [K, D, R])`` of Mamba's low-rank dt projection,
            ``delta[b, k, t] = dt_weight[k] @ dt_low[b, k, t]``: the native kernel then forms each
            step in registers and never stores the ``[B, K, T, D]`` tensor.
        A: ``[K, D, N]``; B, C: ``[B, K, T, N]`` (grid order); D, delta_bias: ``[K, D]``.
        directions: K names from :data:`SCAN_DIRECTIONS` (default the four of
            :data:`CROSS_SCAN_DIRECTIONS`; :data:`BIDIRECTIONAL_DIRECTIONS` for Vim's scan).
        delta_softplus: ``delta = softplus(delta + delta_bias)`` (as Mamba).
        backend: "auto" (the Triton kernel for CUDA tensors; the native C kernel for fp32 CPU inference
            outside autograd and tracing, see :func:`native_cross_scan_applies`; else torch), "torch",
            "native" or "triton" (forced; an error where it cannot run).
        form: torch backend only: "chunked" (:func:`selective_scan`'s two-level recurrence, the
            training path), "doubling" (a log-depth scan with no token loop: the tracing/ONNX form),
            or "auto" (doubling while tracing or exporting, chunked otherwise).
        chunk_size: tokens per chunk of the chunked form.

    Returns:
        ``y: [B, T, D]`` in ``u.dtype``, grid order: ``sum_k (scan_k(...) + D_k * u)``, computed in
        fp32 (fp64 for fp64 inputs). Differentiable on the torch and Triton paths.
    """
    dispatch.check_backend(backend, ("auto", "torch", "native", "triton"))
    if form not in ("auto", "chunked", "doubling"):
        raise ValueError(f"form must be 'auto', 'chunked' or 'doubling', got {form!r}")
    directions = _check_directions(directions)
    if chunk_size is not None:
        require_positive_int("chunk_size", chunk_size)
    delta, dt_low, dt_weight = _delta_parts(delta)
    batch, length, channels, _, count = _check_cross_inputs(u, delta, A, B, C, D, delta_bias, height, width, directions)
    if dt_low is not None:
        _check_low_rank(dt_low, dt_weight, batch, count, length, channels)
    tensors = [t for t in (u, delta, dt_low, dt_weight, A, B, C, D, delta_bias) if t is not None]
    if length == 0:
        return u.new_zeros(batch, 0, channels)
    half_or_single = all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)
    if backend != "native" and dispatch.use_triton(backend, *tensors, eligible=half_or_single,
                                                   why_not="fp32 or half-precision inputs"):
        from linmix.ops.triton.selective_scan import cross_scan_selective_scan_triton

        return cross_scan_selective_scan_triton(u, _full_delta(delta, dt_low, dt_weight), A, B, C, D, delta_bias,
                                                height=height, width=width,
                                                directions=directions, delta_softplus=delta_softplus)
    if backend == "native":
        reasons = native.ineligible(*tensors) + _native_value_reasons(
            delta if dt_low is None else (dt_low, dt_weight), A, delta_bias, delta_softplus)
        if reasons:
            raise ValueError("backend='native' needs " + ", ".join(reasons))
        if not native.available():
            raise RuntimeError("backend='native' requested but the native CPU kernels are unavailable: "
                               + native.unavailable_reason())
    if backend == "native" or (backend == "auto" and native_cross_scan_applies(
            u, delta if dt_low is None else (dt_low, dt_weight), A, B, C, D, delta_bias, delta_softplus=delta_softplus)):
        # With the low-rank pair, the kernel forms each step itself: delta is never stored.
        return native.cross_selective_scan_native(u, delta if dt_low is None else dt_low, A, B, C, D, delta_bias,
                                                  order=scan_order_table(directions, height, width),
                                                  delta_softplus=delta_softplus, dt_weight=dt_weight)
    if form == "auto":
        form = "doubling" if tracing_or_exporting(*tensors) else "chunked"
    y = _cross_scan_torch(u, _full_delta(delta, dt_low, dt_weight), A, B, C, D, delta_bias, height, width, directions,
                          delta_softplus, form, chunk_size)
    return y.to(u.dtype)
