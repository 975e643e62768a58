"""Small C kernels for CPU inference, compiled on first use with the system's C compiler.

PyTorch's eager CPU ops each make a full pass over memory, and the Vision-RWKV block is mostly such
passes besides its GEMMs. These kernels replace the heaviest:

- :func:`bi_wkv_native`: Bi-WKV as linear scans over time with running sums in double, blocked so
  that each block of rows is read from memory twice in all (``bi_wkv.c``), instead of about twenty
  full passes of the torch one-shift form;
- :func:`q_shift_lerp_native`: the quad-directional token shift and all its mixes
  ``lerp(q_shift(x), x, mu_i)`` in one pass (``q_shift.c``), instead of a shift plus one pass per mix;
- :func:`cross_selective_scan_native`: Mamba-1 selective scans over a token grid in up to four orders
  (VMamba's cross-scan), summed, with the state in L1 and no permuted copies (``selective_scan.c``),
  instead of a chunked torch scan over four permuted copies of every input;
- :func:`selective_scan_forward_native`, :func:`selective_scan_backward_native`: one Mamba-1 scan
  (no skip, no gate) and its gradients, for training (``selective_scan_train.c``): the forward keeps
  the state every :data:`TRAIN_CHECKPOINT_EVERY` tokens, the backward recomputes each chunk's states
  from it and runs the reverse scan; :mod:`linmix.ops.selective_scan_native` wraps them in autograd;
- :func:`relu_square_`, :func:`sigmoid_mul_`: the channel mix's ``relu(x)^2`` and ``sigmoid(g) * y``
  in place, one pass each (``elementwise.c``), where torch needs two ops and a temporary.

How it is built and loaded, and when it is not used:

- The sources ship with the package. On first use they are compiled with ``cc -O3
  -march=native`` into ``$LINMIX_CACHE_DIR`` (default ``~/.cache/linmix/kernels``, or the system's
  temp dir when that is not writable), named by a hash of the source, flags, compiler and CPU, and
  loaded with :mod:`ctypes`. Later processes reuse the library; a changed source or machine builds
  a new one. The build takes well under a second.
- No compiler or a failed build: :func:`available` is False and the callers take their torch path
  (same values); :func:`unavailable_reason` says why. ``LINMIX_FORCE_REFERENCE=1`` makes the
  callers' ``backend="auto"`` skip these kernels too.
- Forward only (except the training scan): the callers use it for fp32 CPU tensors when autograd is not recording, and never
  while tracing, exporting or compiling (a graph cannot call into ctypes: the torch path is traced).

Work is split across ``torch.get_num_threads()`` threads (Bi-WKV by channel slices, the shift by
token ranges); :mod:`ctypes` releases the GIL during each call, so the slices run in parallel.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from linmix.ops import dispatch
from linmix.ops._checks import tracing_or_exporting

__all__ = [
    "available", "bi_wkv_native", "cache_dir", "cross_selective_scan_native", "ineligible", "library_path", "q_shift_lerp_native", "relu_square_",
    "selective_scan_backward_native", "selective_scan_forward_native", "sigmoid_mul_", "unavailable_reason", "usable",
]

CACHE_ENV = "LINMIX_CACHE_DIR"
_SOURCES = ("bi_wkv.c", "q_shift.c", "elementwise.c", "selective_scan.c", "selective_scan_train.c")
_HEADERS = ("fast_math.h", "selective_scan_step.h")
_FLAGS = ("-O3", "-march=native", "-std=c99", "-fPIC", "-shared") + (
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()  # full AVX-512 width where present
)
_MAX_SLICE = 2048  # channels per Bi-WKV call: bounds its work buffers
_ALIGN = 16  # channel slices start on 64-byte boundaries (16 floats)
_TIME_BLOCK = 64  # rows per block of the Bi-WKV scans: a block's rows and sums stay in L2


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LINMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/linmix/kernels``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "linmix" / "kernels"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            path = shutil.which(candidate.split()[0])
            if path:
                return path
    return None


def _cpu_signature() -> str:
    """The CPU model and feature flags (``-march=native`` code is only valid on the same kind of CPU)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    source_dir = Path(__file__).parent
    sources = [source_dir / name for name in _SOURCES]
    headers = [source_dir / name for name in _HEADERS]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256()
    for part in [*(f.read_bytes() for f in sources + headers), " ".join(_FLAGS).encode(), version.encode(),
                 _cpu_signature().encode(), platform.machine().encode()]:
        digest.update(part)
        digest.update(b"\0")
    name = f"linmix_kernels_{digest.hexdigest()[:16]}.so"
    for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"linmix-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        target = directory / name
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if not os.access(directory, os.W_OK):
            continue
        # Build under a private name and rename: concurrent first uses never load a half-written file.
        fd, partial = tempfile.mkstemp(prefix=name + ".", suffix=".partial", dir=directory)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *_FLAGS, *map(str, sources), "-o", partial, "-lm"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return target
    raise RuntimeError(f"no writable directory for compiled kernels (tried {cache_dir()} and the temp dir)")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if sys.platform == "win32":
        return None, "the native CPU kernels are built with a POSIX C compiler; not on Windows"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc / clang)"
    try:
        path = _build(compiler)
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"building the native CPU kernels failed: {error}"
    signatures = {  # name: (return type, pointer arguments, int64 arguments)
        "linmix_bi_wkv_f32": (ctypes.c_int, 6, 5),
        "linmix_q_shift_lerp_f32": (None, 3, 7),
        "linmix_relu_square_f32": (None, 1, 2),
        "linmix_sigmoid_mul_f32": (None, 2, 2),
        "linmix_cross_selective_scan_f32": (ctypes.c_int, 10, 13),
        "linmix_selective_scan_forward_f32": (ctypes.c_int, 9, 7),
        "linmix_selective_scan_backward_f32": (ctypes.c_int, 14, 7),
    }
    for name, (restype, pointers, integers) in signatures.items():
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * integers
    return library, ""


def available() -> bool:
    """Whether the native kernels can be used (compiled and loaded now if needed)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    return _load()[1]


def ineligible(*tensors: torch.Tensor, differentiable: bool = False) -> list[str]:
    """What these inputs lack for the native kernels (empty when they qualify): fp32 CPU tensors,
    autograd not recording (the kernels are forward only; ``differentiable=True`` for a kernel with
    a backward, which autograd may record), eager mode (not tracing or exporting)."""
    reasons = []
    if not all(t.device.type == "cpu" for t in tensors):
        reasons.append("CPU tensors")
    if not all(t.dtype == torch.float32 for t in tensors):
        reasons.append("fp32 inputs")
    if not differentiable and dispatch.needs_autograd(*tensors):
        reasons.append("no autograd (the kernel is forward only)")
    if tracing_or_exporting(*tensors):
        reasons.append("eager mode (not tracing or exporting)")
    return reasons


def usable(*tensors: torch.Tensor, differentiable: bool = False) -> bool:
    """Whether a ``backend="auto"`` caller should run the native kernel on these inputs: they qualify
    (:func:`ineligible` is empty), ``LINMIX_FORCE_REFERENCE`` is not set, and the kernels built."""
    if tracing_or_exporting(*tensors):  # decided before anything else: a graph never calls into ctypes
        return False
    return not dispatch.reference_forced() and not ineligible(*tensors, differentiable=differentiable) and available()


def _library() -> ctypes.CDLL:
    library = _load()[0]
    if library is None:
        raise RuntimeError(unavailable_reason())
    return library


def library_path() -> str | None:
    """Path of the loaded kernel library (None when unavailable)."""
    library = _load()[0]
    return None if library is None else library._name


_pools: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of ``workers`` threads for this process (a forked child gets its own: threads do not survive fork)."""
    key = (os.getpid(), workers)
    if key not in _pools:
        _pools[key] = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="linmix-native")
    return _pools[key]


def _split(total: int, parts: int, *, align: int = 1) -> list[tuple[int, int]]:
    """``[0, total)`` as at most ``parts`` contiguous ranges whose starts are multiples of ``align``."""
    if total <= 0:
        return []
    parts = max(1, min(parts, -(-total // align)))
    per_part = -(-total // parts)
    step = -(-per_part // align) * align
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _run_parallel(calls: list) -> list:
    """Run the kernel calls (each releases the GIL) on the pool; their return values in order."""
    if len(calls) <= 1:
        return [call() for call in calls]
    pool = _pool(max(1, torch.get_num_threads()))
    return [future.result() for future in [pool.submit(call) for call in calls]]


def bi_wkv_native(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  gate: torch.Tensor | None = None) -> torch.Tensor:
    """Bi-WKV (the sum of :func:`linmix.ops.wkv.bi_wkv_reference`) for fp32 CPU tensors, forward only.

    ``w, u: [C]``, ``k, v: [B, T, C]`` -> ``[B, T, C]`` fp32; with ``gate: [B, T, C]`` the result is
    ``sigmoid(gate) * bi_wkv(...)`` (Vision-RWKV's receptance) in the same pass. Shapes, dtype and
    device are checked here; the caller checks that ``(T - 1) max|w| <= 20``
    (:func:`linmix.ops.wkv_one_shift.one_shift_applicable`: the keys' exponentials are shifted once
    per channel), as :func:`linmix.ops.wkv.native_bi_wkv_applies` does. Keys may be ``-inf``; a channel whose keys are all masked gives 0.
    """
    library = _library()
    if k.dim() != 3 or v.shape != k.shape or (gate is not None and gate.shape != k.shape) or w.shape != (k.shape[2],) \
            or u.shape != (k.shape[2],):
        raise ValueError(f"bi_wkv_native needs k, v (and gate) of one shape [B, T, C] and w, u of shape [C], got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}, w {tuple(w.shape)}, u {tuple(u.shape)}"
                         + ("" if gate is None else f", gate {tuple(gate.shape)}"))
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (k, v) + (() if gate is None else (gate,))):
        raise ValueError("bi_wkv_native needs fp32 CPU tensors k, v and gate")
    batch, length, channels = k.shape
    k, v = k.detach().contiguous(), v.detach().contiguous()
    gate = None if gate is None else gate.detach().contiguous()
    decay = torch.exp(-w.detach().to(torch.float64)).contiguous()
    bonus = torch.exp(u.detach().to(torch.float64)).contiguous()
    y = torch.empty((batch, length, channels), dtype=torch.float32)
    if y.numel() == 0:
        return y
    calls = []
    for b in range(batch):
        gate_b = None if gate is None else gate[b].data_ptr()
        # One slice per thread, 64-byte aligned, and none wider than _MAX_SLICE channels.
        for c0, c1 in _split(channels, max(torch.get_num_threads(), -(-channels // _MAX_SLICE)), align=_ALIGN):
            calls.append(functools.partial(library.linmix_bi_wkv_f32, k[b].data_ptr(), v[b].data_ptr(), gate_b,
                                           decay.data_ptr(), bonus.data_ptr(), y[b].data_ptr(), length, channels,
                                           c0, c1, _TIME_BLOCK))
    if any(status != 0 for status in _run_parallel(calls)):
        raise MemoryError("bi_wkv_native: could not allocate the kernel's work buffers")
    return y


def _ranges(total: int) -> list[tuple[int, int]]:
    """``total`` elements as one 64-byte aligned range per thread (small tensors: one call)."""
    return _split(total, min(torch.get_num_threads(), total // 4096), align=_ALIGN)


def relu_square_(x: torch.Tensor) -> torch.Tensor:
    """``x = relu(x) ** 2`` in place, one pass (fp32 contiguous CPU ``x``; returns ``x``)."""
    library = _library()
    if not x.is_contiguous() or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"relu_square_ needs a contiguous fp32 CPU tensor, got {x.dtype} on {x.device}, contiguous={x.is_contiguous()}")
    _run_parallel([functools.partial(library.linmix_relu_square_f32, x.data_ptr(), a, b) for a, b in _ranges(x.numel())])
    return x


def sigmoid_mul_(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``y = sigmoid(gate) * y`` in place, one pass (fp32 CPU, same shapes; returns ``y``)."""
    library = _library()
    if not y.is_contiguous() or gate.shape != y.shape:
        raise ValueError(f"sigmoid_mul_ needs a contiguous y and a gate of the same shape, got {tuple(y.shape)} and {tuple(gate.shape)}")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (y, gate)):
        raise ValueError("sigmoid_mul_ needs fp32 CPU tensors")
    gate = gate.detach().contiguous()
    _run_parallel([functools.partial(library.linmix_sigmoid_mul_f32, gate.data_ptr(), y.data_ptr(), a, b)
                   for a, b in _ranges(y.numel())])
    return y


def q_shift_lerp_native(x: torch.Tensor, height: int, width: int, mixes: torch.Tensor) -> torch.Tensor:
    """``torch.lerp(q_shift(x, height, width), x, mixes[i])`` for every row ``i`` of ``mixes``, in one pass.

    ``x: [B, T, C]`` fp32 CPU with ``T = height * width``; ``mixes: [n, C]`` -> ``[n, B, T, C]`` (each
    ``out[i]`` contiguous, ready for a linear layer). See :func:`linmix.ops.q_shift.q_shift` for the
    shift. Forward only.
    """
    library = _library()
    # Shapes are checked here, not only by the callers: a wrong grid would make the C loop read
    # outside x.
    if x.dim() != 3 or x.shape[1] != height * width or height < 0 or width < 0:
        raise ValueError(f"x must be [B, T, C] with T = height * width = {height} * {width}, got {tuple(x.shape)}")
    if mixes.dim() != 2 or mixes.shape[1] != x.shape[2]:
        raise ValueError(f"mixes must be [n, C] with C = {x.shape[2]}, got {tuple(mixes.shape)}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be an fp32 CPU tensor, got {x.dtype} on {x.device}")
    batch, length, channels = x.shape
    x = x.detach().contiguous()
    mixes = mixes.detach().to(torch.float32).contiguous()
    count = mixes.shape[0]
    out = torch.empty((count, batch, length, channels), dtype=torch.float32)
    if out.numel() == 0:
        return out
    calls = []
    for b in range(batch):
        x_b, out_b = x[b].data_ptr(), out[:, b].data_ptr()
        for t0, t1 in _split(length, torch.get_num_threads()):
            calls.append(functools.partial(library.linmix_q_shift_lerp_f32, x_b, mixes.data_ptr(), out_b, count, height,
                                           width, channels, t0, t1, batch * length * channels))
    _run_parallel(calls)
    return out


_SCAN_BLOCK = 128  # channels per block of the selective scan (with the fused dt projection: measured fastest of 32-1024)


def cross_selective_scan_native(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                                D: torch.Tensor | None, delta_bias: torch.Tensor | None, *, order: torch.Tensor,
                                delta_softplus: bool, dt_weight: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linmix.ops.selective_scan.cross_scan_selective_scan` for fp32 CPU tensors, forward only.

    ``u: [B, T, D]`` (grid order), ``delta: [B, K, T, D]``, ``A: [K, D, N]`` with ``delta * A <= 0``
    after the bias and softplus (the caller checks ``A <= 0``), ``B, C: [B, K, T, N]``,
    ``D, delta_bias: [K, D]`` or None. With ``dt_weight: [K, D, R]``, ``delta`` is the low-rank input
    ``[B, K, T, R]`` and the step is ``dt_weight[k] @ delta[b, k, t]``, formed in the kernel (never
    stored). ``order: [K, T]`` int64, row k a permutation of ``0..T-1``: the grid token direction k
    visits at each step (:func:`linmix.ops.selective_scan.scan_order_table`).

    Returns ``y: [B, T, D]`` fp32. Work is split over (batch, channel slice); each call runs all K
    directions of its slice one after the other, summing into its own part of ``y`` (no races, no
    per-direction buffers, and the slice's columns of u and y stay in cache between directions).
    """
    library = _library()
    if u.dim() != 3 or order.dim() != 2 or order.shape[1] != u.shape[1] or order.dtype != torch.int64:
        raise ValueError(f"u must be [B, T, D] and order [K, T] int64, got u {tuple(u.shape)}, order {tuple(order.shape)} {order.dtype}")
    batch, length, channels = u.shape
    count = order.shape[0]
    state_size = A.shape[-1]
    rank = 0 if dt_weight is None else dt_weight.shape[-1]
    expected = {"delta": (delta, (batch, count, length, rank or channels)),
                "dt_weight": (dt_weight, (count, channels, rank)), "A": (A, (count, channels, state_size)),
                "B": (B, (batch, count, length, state_size)), "C": (C, (batch, count, length, state_size)),
                "D": (D, (count, channels)), "delta_bias": (delta_bias, (count, channels))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    # Every row must be a permutation: the C loop indexes u, y, delta, B and C with these values.
    if not torch.equal(order.sort(dim=1).values, torch.arange(length).expand(count, length)):
        raise ValueError("each row of order must be a permutation of 0..T-1")
    tensors = [t for t in (u, delta, dt_weight, A, B, C, D, delta_bias) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("cross_selective_scan_native needs fp32 CPU tensors")
    dt_weight = None if dt_weight is None else dt_weight.detach().contiguous()
    u, A = u.detach().contiguous(), A.detach().contiguous()
    D = None if D is None else D.detach().contiguous()
    delta_bias = None if delta_bias is None else delta_bias.detach().contiguous()
    # delta, B and C are read through their strides (a view of a projection's output is fine) as long
    # as the innermost axis is contiguous and B and C share a layout.
    delta = delta.detach()
    if delta.stride(3) != 1:
        delta = delta.contiguous()
    B, C = B.detach(), C.detach()
    if B.stride(3) != 1 or C.stride(3) != 1 or B.stride() != C.stride():
        B, C = B.contiguous(), C.contiguous()
    order = order.contiguous()
    y = torch.empty((batch, length, channels), dtype=torch.float32)
    if y.numel() == 0:
        return y
    slices = _split(channels, max(1, -(-torch.get_num_threads() // batch)), align=_ALIGN)
    calls = []
    for b in range(batch):
        for c0, c1 in slices:
            calls.append(functools.partial(
                library.linmix_cross_selective_scan_f32, u[b].data_ptr(), delta[b].data_ptr(),
                None if dt_weight is None else dt_weight.data_ptr(), A.data_ptr(), B[b].data_ptr(),
                C[b].data_ptr(), None if D is None else D.data_ptr(), None if delta_bias is None else delta_bias.data_ptr(),
                order.data_ptr(), y[b].data_ptr(), count, length, channels, state_size, rank, delta.stride(1),
                delta.stride(2), B.stride(1), B.stride(2), int(bool(delta_softplus)), c0, c1, _SCAN_BLOCK))
    if any(status != 0 for status in _run_parallel(calls)):
        raise MemoryError("cross_selective_scan_native: could not allocate the kernel's work buffers")
    return y


_TRAIN_BLOCK = 128  # channels per block of the training scan (measured fastest of 32-256 at D = 512, N = 16)
#: Tokens between the states the training forward keeps for the backward (it recomputes the rest):
#: 1/32 of all states in memory, and a chunk's recomputed states and decays (65 x N x 128 floats,
#: 530 kB at N = 16) stay in L2.
TRAIN_CHECKPOINT_EVERY = 32


def _check_scan_inputs(name: str, u, delta, A, B, C, **extra) -> tuple[int, int, int, int]:
    """Shapes (u, delta [Bt, T, D]; A [D, N]; B, C [Bt, T, N]; extras by their expected shape), fp32 CPU."""
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"{name} needs u [B, T, D] and A [D, N], got u {tuple(u.shape)}, A {tuple(A.shape)}")
    batch, length, channels = u.shape
    state_size = A.shape[1]
    expected = {"delta": (delta, (batch, length, channels)), "A": (A, (channels, state_size)),
                "B": (B, (batch, length, state_size)), "C": (C, (batch, length, state_size))}
    sizes = {"[B, D, N]": (batch, channels, state_size), "[B, T, D]": (batch, length, channels)}
    expected.update({key: (tensor, sizes[layout]) for key, (tensor, layout) in extra.items()})
    for key, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: {key} must have shape {shape}, got {tuple(tensor.shape)}")
    tensors = [u, delta, A, B, C] + [t for t, _ in extra.values() if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError(f"{name} needs fp32 CPU tensors")
    return batch, length, channels, state_size


def _detached(*tensors):
    return [None if t is None else t.detach().contiguous() for t in tensors]


def _row_pointer(tensor: torch.Tensor | None, index: int) -> int | None:
    """``tensor[index].data_ptr()`` without making the view (a contiguous tensor; None stays None)."""
    return None if tensor is None else tensor.data_ptr() + index * tensor.stride(0) * tensor.element_size()


def selective_scan_forward_native(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                  C: torch.Tensor, initial_state: torch.Tensor | None = None, *,
                                  checkpoint_every: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The Mamba-1 scan without skip or gate, one direction, fp32 CPU (``selective_scan_train.c``).

    ``u, delta: [B, T, D]`` (delta already biased and softplus'd, ``>= 0``), ``A: [D, N]`` with
    ``A <= 0`` (the caller checks both: the kernel's exp is for non-positive arguments),
    ``B, C: [B, T, N]``, ``initial_state: [B, D, N]`` or None (zeros). Returns ``(y [B, T, D],
    final state [B, D, N], checkpoints)``: with ``checkpoint_every = K > 0`` the states before
    tokens 0, K, 2K, ... as ``[B, ceil(T / K), N, D]`` for :func:`selective_scan_backward_native`,
    else None. Not differentiable itself (see :mod:`linmix.ops.selective_scan_native`).
    """
    library = _library()
    batch, length, channels, state_size = _check_scan_inputs("selective_scan_forward_native", u, delta, A, B, C,
                                                             initial_state=(initial_state, "[B, D, N]"))
    u, delta, A, B, C, initial_state = _detached(u, delta, A, B, C, initial_state)
    y = torch.empty((batch, length, channels), dtype=torch.float32)
    final = torch.zeros((batch, channels, state_size), dtype=torch.float32) if initial_state is None else initial_state.clone()
    chunks = -(-length // checkpoint_every) if checkpoint_every > 0 else 0
    checkpoints = torch.empty((batch, chunks, state_size, channels), dtype=torch.float32) if checkpoint_every > 0 else None
    if length == 0 or channels == 0:
        return y, final, checkpoints
    calls = []
    for b in range(batch):
        for c0, c1 in _split(channels, max(1, -(-torch.get_num_threads() // batch)), align=_ALIGN):
            calls.append(functools.partial(
                library.linmix_selective_scan_forward_f32, _row_pointer(u, b), _row_pointer(delta, b), A.data_ptr(),
                _row_pointer(B, b), _row_pointer(C, b), _row_pointer(initial_state, b), _row_pointer(y, b),
                _row_pointer(final, b), None if state_size == 0 else _row_pointer(checkpoints, b),
                length, channels, state_size, max(1, checkpoint_every), c0, c1, _TRAIN_BLOCK))
    if any(status != 0 for status in _run_parallel(calls)):
        raise MemoryError("selective_scan_forward_native: could not allocate the kernel's work buffers")
    return y, final, checkpoints


def selective_scan_backward_native(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                   C: torch.Tensor, checkpoints: torch.Tensor, grad_y: torch.Tensor | None,
                                   grad_final: torch.Tensor | None, *, checkpoint_every: int,
                                   initial_state_grad: bool) -> tuple[torch.Tensor, ...]:
    """The gradients of :func:`selective_scan_forward_native`'s ``y`` and final state, given
    ``grad_y [B, T, D]`` and ``grad_final [B, D, N]`` (either None for zeros) and the forward's
    ``checkpoints`` taken every ``checkpoint_every`` tokens.

    Returns ``(du, ddelta, dA, dB, dC, d_initial_state)`` (the last None unless ``initial_state_grad``).
    Each (batch element, channel slice) call adds its share of dB and dC into its own buffers and
    writes its rows of a per-batch-element dA; they are summed here.
    """
    library = _library()
    batch, length, channels, state_size = _check_scan_inputs(
        "selective_scan_backward_native", u, delta, A, B, C, grad_y=(grad_y, "[B, T, D]"), grad_final=(grad_final, "[B, D, N]"))
    chunks = -(-length // checkpoint_every) if checkpoint_every > 0 else -1
    if tuple(checkpoints.shape) != (batch, chunks, state_size, channels):
        raise ValueError(f"checkpoints must have shape {(batch, chunks, state_size, channels)} (every {checkpoint_every} "
                         f"tokens), got {tuple(checkpoints.shape)}")
    u, delta, A, B, C, checkpoints, grad_y, grad_final = _detached(u, delta, A, B, C, checkpoints, grad_y, grad_final)
    if grad_y is None:
        grad_y = torch.zeros((batch, length, channels), dtype=torch.float32)
    slices = _split(channels, max(1, -(-torch.get_num_threads() // batch)), align=_ALIGN)
    grad_u = torch.empty((batch, length, channels), dtype=torch.float32)
    grad_delta = torch.empty_like(grad_u)
    grad_A = torch.zeros((batch, channels, state_size), dtype=torch.float32)
    grad_B = torch.zeros((max(1, len(slices)), batch, length, state_size), dtype=torch.float32)
    grad_C = torch.zeros_like(grad_B)
    grad_h0 = torch.empty((batch, channels, state_size), dtype=torch.float32) if initial_state_grad else None
    if length == 0 or channels == 0 or state_size == 0:
        grad_u.zero_()
        grad_delta.zero_()
        if grad_h0 is not None:
            grad_h0.copy_(grad_final if grad_final is not None else torch.zeros_like(grad_h0))
        return grad_u, grad_delta, grad_A.sum(0), grad_B.sum(0), grad_C.sum(0), grad_h0
    calls = []
    for b in range(batch):
        for index, (c0, c1) in enumerate(slices):
            calls.append(functools.partial(
                library.linmix_selective_scan_backward_f32, _row_pointer(u, b), _row_pointer(delta, b), A.data_ptr(),
                _row_pointer(B, b), _row_pointer(C, b), _row_pointer(checkpoints, b), _row_pointer(grad_y, b),
                _row_pointer(grad_final, b), _row_pointer(grad_u, b), _row_pointer(grad_delta, b), _row_pointer(grad_A, b),
                _row_pointer(grad_B[index], b), _row_pointer(grad_C[index], b), _row_pointer(grad_h0, b), length,
                channels, state_size, checkpoint_every, c0, c1, _TRAIN_BLOCK))
    if any(status != 0 for status in _run_parallel(calls)):
        raise MemoryError("selective_scan_backward_native: could not allocate the kernel's work buffers")
    return grad_u, grad_delta, grad_A.sum(0), grad_B.sum(0), grad_C.sum(0), grad_h0
