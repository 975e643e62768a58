"""Input validation shared by the ops: errors a user can cause name the expected shapes."""

from __future__ import annotations

import torch


def require_floating(name: str, tensor: torch.Tensor, layout: str) -> None:
    """Raise ValueError unless ``tensor`` is a floating-point torch.Tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape {layout}, got dtype {tensor.dtype}")


def require_shape(name: str, tensor: torch.Tensor, layout: str, ndim: int) -> None:
    """Raise ValueError unless ``tensor`` is floating point with ``ndim`` dimensions."""
    require_floating(name, tensor, layout)
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(tensor.shape)}")


def require_same(names: str, layout: str, *sizes: tuple[int, ...]) -> None:
    """Raise ValueError unless all given size tuples are equal (e.g. the [B, T, H] of q, k, v)."""
    if any(s != sizes[0] for s in sizes[1:]):
        shown = ", ".join(str(tuple(s)) for s in sizes)
        raise ValueError(f"{names} must agree in {layout}, got {shown}")


def require_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed and accumulated in fp32; fp32/fp64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tracing_or_exporting(*tensors: torch.Tensor) -> bool:
    """True under torch.export / torch.compile / JIT / ONNX tracing, or for meta tensors: callers
    then take their branch-free form and make no data-dependent Python choices."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and (compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()):
        return True
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    return any(t.device.type == "meta" for t in tensors)
