"""The native C selective scan for CPU training: :func:`native_scan`, the Mamba-1 recurrence
without skip or gate (``selective_scan_train.c``) as a differentiable op.

Below the dispatcher :func:`linmix.ops.selective_scan.selective_scan`, which chooses it for fp32
CPU tensors in eager mode and applies the step-size bias and softplus before it and the skip and
gate after it in torch (so autograd carries their gradients). Under autograd the forward keeps the
state every :data:`linmix.ops.native.TRAIN_CHECKPOINT_EVERY` tokens (1/32 of all states: about
2 MB per Mamba-small layer at batch 4 x 512, against 67 MB for every state) and the backward
recomputes each chunk's states from them, so memory stays close to the torch path's inputs alone.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from linmix.ops import native


class _NativeSelectiveScan(torch.autograd.Function):
    """``(u, delta, A, B, C, initial_state) -> (y, final_state)``; see :func:`native_scan`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, initial_state):
        every = native.TRAIN_CHECKPOINT_EVERY
        # The kernels read channel-contiguous rows: copy once here and keep the copies for the backward.
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        y, final, checkpoints = native.selective_scan_forward_native(u, delta, A, B, C, initial_state, checkpoint_every=every)
        ctx.save_for_backward(u, delta, A, B, C, checkpoints)
        ctx.has_initial_state = initial_state is not None
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @once_differentiable  # the backward is a kernel too: no second derivative
    def backward(ctx, grad_y, grad_final):
        u, delta, A, B, C, checkpoints = ctx.saved_tensors
        grad_u, grad_delta, grad_A, grad_B, grad_C, grad_h0 = native.selective_scan_backward_native(
            u, delta, A, B, C, checkpoints, grad_y, grad_final, checkpoint_every=native.TRAIN_CHECKPOINT_EVERY,
            initial_state_grad=ctx.has_initial_state and ctx.needs_input_grad[5])
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_h0


def native_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``, ``y_t = <h_t, C_t>`` for fp32 CPU tensors.

    ``u, delta: [B, T, D]`` (``delta >= 0``: already biased and softplus'd), ``A: [D, N]`` with
    ``A <= 0``, ``B, C: [B, T, N]``, ``initial_state: [B, D, N]`` or None (zeros); the caller checks
    the signs (:func:`linmix.ops.selective_scan.native_scan_applies`). Returns ``(y [B, T, D], final
    state [B, D, N])``, differentiable in every input when autograd records (forward only, with no
    states kept, when it does not).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, initial_state)):
        return _NativeSelectiveScan.apply(u, delta, A, B, C, initial_state)
    y, final, _ = native.selective_scan_forward_native(u, delta, A, B, C, initial_state)
    return y, final
