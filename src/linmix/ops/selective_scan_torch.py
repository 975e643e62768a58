"""The PyTorch forms of the selective scan (Mamba's S6), below the dispatcher in
:mod:`linmix.ops.selective_scan`: the chunked two-level recurrence (training and CPU prefill), the
log-depth doubling scan (tracing / ONNX export), and the scan orders of a 2D token grid with the
cross-scan over several of them. GPU kernels' backward passes call these directly (a kernel never
imports its dispatcher).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from linmix.ops._checks import accumulation_dtype

def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtypes = [t.dtype for t in tensors if t is not None]
    return accumulation_dtype(functools.reduce(torch.promote_types, dtypes))


def _prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> torch.Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _to_chunks(x: torch.Tensor, chunk: int, num_chunks: int) -> torch.Tensor:
    """[B, T, ...] -> [L, B, num_chunks, ...], zero-padded at the end (contiguous per position)."""
    batch, length = x.shape[:2]
    pad = chunk * num_chunks - length
    if pad:
        x = torch.cat([x, x.new_zeros(batch, pad, *x.shape[2:])], dim=1)
    return x.view(batch, num_chunks, chunk, *x.shape[2:]).movedim(2, 0).contiguous()


def _default_chunk_size(length: int) -> int:
    # The Python step count is about 2 * L + T / L: smallest near L = sqrt(T / 2), kept a power of two.
    return max(1, min(256, 2 ** round(math.log2(max(1.0, math.sqrt(length / 2))))))


def _chunked_scan(u, delta, A, B, C, state, chunk_size):
    """The chunked recurrence without skip or gate: ``u, delta [Bt, T, D]`` (delta already biased and
    softplus'd), ``A`` broadcastable to ``[Bt, 1, D, N]`` (``[D, N]``, or one A per batch row),
    ``B, C [Bt, T, N]``, ``state [Bt, D, N]`` or None -> ``(y [Bt, T, D], final state)``."""
    batch, length, channels = u.shape
    state_size = B.shape[-1]
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    # Padding tokens have delta = 0 (decay 1) and zero input, so they leave the state unchanged.
    delta_c = _to_chunks(delta, chunk, num_chunks)  # [L, B, nc, D]
    input_c = _to_chunks(delta * u, chunk, num_chunks)  # [L, B, nc, D]
    B_c = _to_chunks(B, chunk, num_chunks)  # [L, B, nc, N]
    C_c = _to_chunks(C, chunk, num_chunks)[..., None]  # [L, B, nc, N, 1]

    # 1. Every chunk from a zero state, all chunks at once.
    h = None
    outputs = []
    for position in range(chunk):
        update = input_c[position][..., None] * B_c[position][:, :, None, :]  # [B, nc, D, N]
        if h is None:
            h = update
        else:
            h = torch.addcmul(update, torch.exp(delta_c[position][..., None] * A), h)
        outputs.append(torch.matmul(h, C_c[position]).squeeze(-1))
    y = torch.stack(outputs, dim=0)  # [L, B, nc, D]

    # 2. Carry the state across chunk boundaries; 3. add what each chunk inherits.
    if num_chunks == 1 and state is None:
        final = h[:, 0]
    else:
        # Cumulative log-decay from the chunk start, formed before the exp (all exponents <= 0 for A<0, delta>0).
        elapsed = torch.cumsum(delta_c, dim=0)  # [L, B, nc, D]
        chunk_decay = torch.exp(elapsed[-1][..., None] * A)  # [B, nc, D, N]
        carried = state if state is not None else h.new_zeros(batch, channels, state_size)
        starts = []
        for index in range(num_chunks):
            starts.append(carried)
            carried = torch.addcmul(h[:, index], chunk_decay[:, index], carried)
        final = carried
        start_states = torch.stack(starts, dim=1)  # [B, nc, D, N]
        inherited = [
            torch.matmul(torch.exp(elapsed[position][..., None] * A) * start_states, C_c[position]).squeeze(-1)
            for position in range(chunk)
        ]
        y = y + torch.stack(inherited, dim=0)

    y = y.movedim(0, 2).reshape(batch, num_chunks * chunk, channels)[:, :length]
    return y, final


#: The scan orders over a ``height x width`` grid whose tokens are stored row-major (token ``h * width + w``).
SCAN_DIRECTIONS = ("row", "column", "row_reversed", "column_reversed")
#: VMamba's SS2D: row-major, column-major and both reversed.
CROSS_SCAN_DIRECTIONS = SCAN_DIRECTIONS
#: Vim's bidirectional scan: the row-major sequence forward and backward.
BIDIRECTIONAL_DIRECTIONS = ("row", "row_reversed")


def to_scan_order(x: torch.Tensor, direction: str, height: int, width: int) -> torch.Tensor:
    """``x: [..., T, F]`` in row-major grid order -> the same tokens in ``direction``'s scan order."""
    if direction.startswith("column"):
        x = x.unflatten(-2, (height, width)).transpose(-3, -2).flatten(-3, -2)
    return x.flip(-2) if direction.endswith("reversed") else x


def from_scan_order(x: torch.Tensor, direction: str, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`to_scan_order`: scan order -> row-major grid order."""
    if direction.endswith("reversed"):
        x = x.flip(-2)
    if direction.startswith("column"):
        x = x.unflatten(-2, (width, height)).transpose(-3, -2).flatten(-3, -2)
    return x


@functools.lru_cache(maxsize=64)
def _cached_order_table(directions: tuple[str, ...], height: int, width: int) -> torch.Tensor:
    grid = torch.arange(height * width, dtype=torch.int64).view(1, -1, 1)
    return torch.stack([to_scan_order(grid, d, height, width).flatten() for d in directions])


def scan_order_table(directions, height: int, width: int) -> torch.Tensor:
    """``[K, T]`` int64: row k lists the grid tokens in direction k's scan order (the native kernel's input)."""
    return _cached_order_table(_check_directions(directions), height, width)


def _check_directions(directions) -> tuple[str, ...]:
    directions = tuple(directions) if not isinstance(directions, str) else (directions,)
    if not directions or any(d not in SCAN_DIRECTIONS for d in directions):
        raise ValueError(f"directions must be a non-empty sequence of {SCAN_DIRECTIONS}, got {directions!r}")
    return directions


def _doubling_scan(u, delta, A, B, C):
    """The recurrence as a log-depth (Hillis-Steele) scan with no Python loop over tokens:
    ``ceil(log2 T)`` rounds of ``h_t += a_t h_{t-s}, a_t *= a_{t-s}`` for s = 1, 2, 4, ...

    Same arguments as :func:`_chunked_scan` (zero initial state) -> ``y [Bt, T, D]``. Does log2(T)
    times the work of the scan, but its graph is a few slices, products and concatenations per
    round, so it is the form for tracing and ONNX export (the chunked form unrolls about
    2 sqrt(2T) Python steps into the graph). Decays are products of factors in (0, 1]: no overflow.
    """
    length = u.shape[1]
    decay = torch.exp(delta[..., None] * A)  # [Bt, T, D, N]
    h = (delta * u)[..., None] * B[:, :, None, :]
    shift = 1
    while shift < length:
        h = torch.cat([h[:, :shift], torch.addcmul(h[:, shift:], decay[:, shift:], h[:, :-shift])], dim=1)
        if 2 * shift < length:
            decay = torch.cat([decay[:, :shift], decay[:, shift:] * decay[:, :-shift]], dim=1)
        shift *= 2
    return torch.matmul(h, C[..., None]).squeeze(-1)


def _cross_scan_torch(u, delta, A, B, C, D, delta_bias, height, width, directions, delta_softplus, form, chunk_size):
    """Every direction's sequence at once: the K permuted copies are folded into the batch (one A per row)."""
    batch, length, channels = u.shape
    count = len(directions)
    dtype = _compute_dtype(u, delta, A, B, C, D, delta_bias)

    def stacked(x, per_direction):  # [B, K, T, F] (or the shared [B, T, F]) -> [B * K, T, F] in scan order
        parts = [to_scan_order(x[:, k] if per_direction else x, d, height, width) for k, d in enumerate(directions)]
        return torch.stack(parts, dim=1).flatten(0, 1)

    u_all = stacked(u.to(dtype), False)
    bias = None if delta_bias is None else delta_bias.to(dtype).repeat(batch, 1)[:, None, :]  # [B * K, 1, D]
    delta_all = _prepare_delta(stacked(delta, True), bias, delta_softplus, dtype)
    A_all = A.to(dtype)[None].expand(batch, -1, -1, -1).flatten(0, 1)[:, None]  # [B * K, 1, D, N]
    B_all, C_all = stacked(B.to(dtype), True), stacked(C.to(dtype), True)
    if form == "doubling":
        y = _doubling_scan(u_all, delta_all, A_all, B_all, C_all)
    else:
        y, _ = _chunked_scan(u_all, delta_all, A_all, B_all, C_all, None, chunk_size or _default_chunk_size(length))
    if D is not None:
        y = torch.addcmul(y, u_all, D.to(dtype).repeat(batch, 1)[:, None, :])
    y = y.unflatten(0, (batch, count))
    merged = None
    for k, direction in enumerate(directions):
        y_k = from_scan_order(y[:, k], direction, height, width)
        merged = y_k if merged is None else merged + y_k
    return merged
