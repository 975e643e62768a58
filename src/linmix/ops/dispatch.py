"""Choosing between an op's reference path and its GPU kernel.

Every op keeps its torch path (the CPU path and the test oracle). A GPU path (a Triton kernel of
ours, or PyTorch's FlexAttention) is chosen by the op's ``backend`` argument:

- ``"auto"`` (default): the GPU path for CUDA tensors when it is installed and eligible, else torch;
  while tracing, exporting or compiling always torch (the compiler makes its own kernels from it,
  and the choice stays out of the traced graph);
- ``"torch"``: always the torch path;
- the GPU path's own name (``"triton"``, ``"flex"``): always that path, an error where it cannot run.
  Triton kernels also run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
  before the kernels are imported), which is how CI checks them.

Setting the environment variable ``LINMIX_FORCE_REFERENCE=1`` makes every ``"auto"`` choose the
torch path (to rule a kernel out while debugging, or to time the torch path on a GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from linmix.ops._checks import tracing_or_exporting

FORCE_REFERENCE_ENV = "LINMIX_FORCE_REFERENCE"


def reference_forced() -> bool:
    """True when ``LINMIX_FORCE_REFERENCE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (the ``gpu`` extra; ``dev`` has it too)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def flex_attention_installed() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ModuleNotFoundError:
        return False


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors): ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str, choices: tuple[str, ...]) -> None:
    if backend not in choices:
        raise ValueError(f"backend must be one of {', '.join(repr(c) for c in choices)}, got {backend!r}")


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """True when autograd would record an op on these tensors (the forward-only kernels then step aside)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def use_triton(backend: str, *tensors: torch.Tensor, eligible: bool, why_not: str) -> bool:
    """Resolve ``backend`` ("auto", "torch" or "triton") for an op whose inputs are ``tensors``.

    ``eligible``: the op's own conditions for its kernel (dtype, feature map, ...); ``why_not``
    names them for the error raised when ``backend="triton"`` is forced on ineligible inputs.
    """
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not eligible:
            raise ValueError(f"backend='triton' needs {why_not}")
        if not triton_installed():
            raise RuntimeError("backend='triton' requested but the triton package is not installed (pip install 'linmix[gpu]')")
        if not on_cuda and not triton_interpreting():
            raise ValueError("backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                             "before linmix's Triton kernels are first imported")
        return True
    if tracing_or_exporting(*tensors):
        return False
    return eligible and on_cuda and not reference_forced() and triton_installed()
