"""Triton kernels behind the ops (imported lazily: only when a kernel is first used).

- :mod:`linmix.ops.triton.taylor_step`: one fused kernel per linear-attention decode step (Taylor
  feature map of q and k, fp32 state update, readout) behind :func:`linmix.ops.linear_attention_step`;
- :mod:`linmix.ops.triton.bi_wkv`: Bi-WKV forward (chunk-parallel sweeps in RWKV-4's max-tracked
  form, three launches) behind :func:`linmix.ops.bi_wkv`.

Each op chooses its kernel for CUDA tensors (see :mod:`linmix.ops.dispatch`); the torch path stays
the oracle. Under ``TRITON_INTERPRET=1`` (set before these modules are imported) the kernels run on
CPU tensors, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch


def require_runnable(kernel, *tensors: torch.Tensor) -> None:
    """Raise a clear error when a compiled (non-interpreted) kernel would be launched on CPU tensors."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if not interpreted and not all(t.is_cuda for t in tensors):
        raise ValueError(
            "Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            "linmix.ops.triton's kernels were first imported"
        )
