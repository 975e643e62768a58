"""Gradient checks by finite differences: a module's autograd gradients (in the dtype it trains in)
against central differences of an fp64 copy of it, along one random direction per tensor."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


def assert_gradients_match_finite_differences(
    module: torch.nn.Module,
    run: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    tolerance: float = 1e-2,
    step: float = 1e-3,
    what: str = "",
) -> None:
    """``run(module, *inputs)`` returns a scalar loss. Its gradients w.r.t. every parameter and every
    input, from one backward of ``module`` as given, must match the central difference
    ``(L(t + step d) - L(t - step d)) / (2 step)`` of an fp64 copy, for a random unit direction ``d``
    per tensor, within ``tolerance`` of ``||grad * d||_2`` (the size of such a random directional
    derivative: a relative error e in the gradient moves it by about e times that).

    The step is large for fp64 because some layers keep parts of their computation in fp32 (Mamba's
    scan state, for one): a step of 1e-6 would measure that rounding, not the derivative."""
    inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)
    module.zero_grad()
    run(module, *inputs).backward()
    analytic = {f"param {name}": p.grad for name, p in module.named_parameters() if p.requires_grad}
    analytic.update({f"input {i}": x.grad for i, x in enumerate(inputs)})

    reference = copy.deepcopy(module).double()
    reference_inputs = [x.detach().double() for x in inputs]
    tensors = {f"param {name}": p for name, p in reference.named_parameters() if p.requires_grad}
    tensors.update({f"input {i}": x for i, x in enumerate(reference_inputs)})
    generator = torch.Generator().manual_seed(0)
    checks = []  # (name, autograd, finite difference, scale)
    with torch.no_grad():
        for name, tensor in tensors.items():
            grad = analytic[name]
            assert grad is not None, f"{what} {name}: no gradient"
            direction = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            direction /= direction.norm()
            tensor.add_(step * direction)
            plus = float(run(reference, *reference_inputs))
            tensor.sub_(2 * step * direction)
            minus = float(run(reference, *reference_inputs))
            tensor.add_(step * direction)
            products = grad.double() * direction
            checks.append((name, float(products.sum()), (plus - minus) / (2 * step), float(products.norm())))
    # fp32 gradients are exact to about 1e-7 of the largest ones, not of each: a tensor whose
    # gradient is tiny next to the others is compared to a floor of 1e-5 of the largest scale.
    floor = 1e-5 * max(scale for *_, scale in checks)
    for name, expected, numeric, scale in checks:
        assert abs(numeric - expected) <= tolerance * max(scale, floor) + 1e-12, (
            f"{what} {name}: directional derivative {expected:.6e} by autograd, {numeric:.6e} by finite "
            f"differences (scale {scale:.3e})")
