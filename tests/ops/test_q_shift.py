"""Q-Shift (linmix.ops.q_shift): the oracle by hand, the eager buffer form, the tracing (concat) form,
the traced / compiled path and the native kernel against it on odd grids and channel counts, the
mixes, gradients and errors."""

import pytest
import torch

from linmix.ops import native, q_shift, q_shift_reference, shifted_mixes

# (height, width, channels): single rows / columns, one cell, odd grids, channels not divisible by 4
GRIDS = [(1, 1, 4), (1, 7, 8), (6, 1, 8), (3, 5, 10), (5, 7, 7), (2, 3, 3), (4, 4, 16), (3, 5, 13)]
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")


def _grid_tokens(height, width, channels):
    """x[0, h * width + w, c] = 100 c + 10 h + w + 1: every value distinct and nonzero."""
    h = torch.arange(height)[:, None, None]
    w = torch.arange(width)[None, :, None]
    c = torch.arange(channels)[None, None, :]
    return (100 * c + 10 * h + w + 1).double().reshape(1, height * width, channels)


def _random_tokens(batch, height, width, channels, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed + 100 * height + width)
    return torch.randn(batch, height * width, channels, generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("form", [q_shift_reference, q_shift])
def test_each_group_moves_in_its_direction(form):
    height, width, channels = 3, 4, 9  # g = 2; channel 8 passes through
    y = form(_grid_tokens(height, width, channels), height, width).reshape(height, width, channels)

    def value(h, w, c):
        return 100 * c + 10 * h + w + 1

    # Spot values by hand at the token (h=1, w=2).
    assert y[1, 2, 0] == value(1, 1, 0)  # left neighbour
    assert y[1, 2, 3] == value(1, 3, 3)  # right neighbour
    assert y[1, 2, 4] == value(0, 2, 4)  # above
    assert y[1, 2, 7] == value(2, 2, 7)  # below
    assert y[1, 2, 8] == value(1, 2, 8)  # pass-through
    # Every element, with zeros outside the grid.
    offsets = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}
    for h in range(height):
        for w in range(width):
            for c in range(channels):
                dh, dw = offsets.get(c // 2, (0, 0))
                hh, ww = h + dh, w + dw
                expected = value(hh, ww, c) if 0 <= hh < height and 0 <= ww < width else 0
                assert y[h, w, c] == expected, (h, w, c)


def test_single_row_and_column():
    x = torch.randn(2, 5, 8)
    row = q_shift(x, 1, 5)  # no neighbour above or below
    assert (row[..., 4:] == 0).all()
    assert torch.equal(row[:, 1:, :2], x[:, :-1, :2])
    column = q_shift(x, 5, 1)  # no neighbour left or right
    assert (column[..., :4] == 0).all()
    assert torch.equal(column[:, 1:, 4:6], x[:, :-1, 4:6])


def test_fewer_than_four_channels_pass_through():
    x = torch.randn(2, 6, 3)
    for form in ("buffer", "concat"):
        assert torch.equal(q_shift(x, 2, 3, form=form), x)
    assert torch.equal(q_shift_reference(x, 2, 3), x)


@pytest.mark.parametrize("height, width, channels", GRIDS)
@pytest.mark.parametrize("form", ["buffer", "concat", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forms_equal_the_reference_exactly(height, width, channels, form, dtype):
    """The shift only moves values: every form is bit-exact in every dtype."""
    x = _random_tokens(2, height, width, channels, dtype)
    assert torch.equal(q_shift(x, height, width, form=form), q_shift_reference(x, height, width))


@pytest.mark.parametrize("form", ["buffer", "concat"])
def test_gradients_equal_the_reference(form):
    x = _random_tokens(2, 3, 5, 10, torch.float64).requires_grad_()
    weight = torch.randn(2, 15, 10, dtype=torch.float64)
    (grad,) = torch.autograd.grad((q_shift(x, 3, 5, form=form) * weight).sum(), x)
    (expected,) = torch.autograd.grad((q_shift_reference(x, 3, 5) * weight).sum(), x)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("height, width, channels", [(1, 7, 8), (6, 1, 8), (3, 5, 10)])
def test_compiled_path_equals_the_reference(height, width, channels):
    """Under torch.compile the concat form is traced; one graph, same values."""
    torch._dynamo.reset()
    try:
        x = _random_tokens(2, height, width, channels)
        mu = torch.rand(channels)
        compiled = torch.compile(lambda t: shifted_mixes(t, height, width, mu, 1 - mu), backend="aot_eager", fullgraph=True)
        with torch.no_grad():  # the eager call would take the native kernel here: the compiled one must not
            out = compiled(x)
        shifted = q_shift_reference(x, height, width)
        for result, mix in zip(out, (mu, 1 - mu)):
            torch.testing.assert_close(result, torch.lerp(shifted, x, mix), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


@needs_native
@pytest.mark.parametrize("height, width, channels", GRIDS)
def test_native_mixes_equal_the_reference(height, width, channels):
    x = _random_tokens(3, height, width, channels)
    mixes = [torch.rand(channels), torch.zeros(channels), torch.ones(channels)]  # lerp's end points included
    with torch.no_grad():
        out = shifted_mixes(x, height, width, *mixes, backend="native")
    shifted = q_shift_reference(x, height, width)
    for mix, result in zip(mixes, out):
        torch.testing.assert_close(result, torch.lerp(shifted, x, mix), rtol=0, atol=1e-6)


@pytest.mark.parametrize("height, width, channels", [(3, 5, 10), (1, 4, 7)])
def test_torch_mixes_equal_the_reference_and_differentiate(height, width, channels):
    x = _random_tokens(2, height, width, channels, torch.float64).requires_grad_()
    mixes = [torch.rand(channels, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    out = shifted_mixes(x, height, width, *mixes, backend="torch")
    shifted = q_shift_reference(x, height, width)
    expected = [torch.lerp(shifted, x, mix) for mix in mixes]
    for result, reference in zip(out, expected):
        torch.testing.assert_close(result, reference, rtol=0, atol=0)
    weights = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), [x, *mixes])
    expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), [x, *mixes])
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference)


@needs_native
def test_auto_backend_uses_native_only_in_fp32_inference(monkeypatch):
    calls = []
    real = native.q_shift_lerp_native
    monkeypatch.setattr(native, "q_shift_lerp_native", lambda *a: calls.append(1) or real(*a))
    x, mu = _random_tokens(1, 3, 5, 8), torch.rand(8)
    with torch.no_grad():
        shifted_mixes(x, 3, 5, mu)
        assert calls == [1]
        shifted_mixes(x.double(), 3, 5, mu.double())  # fp64: torch
        shifted_mixes(x, 3, 5, mu, backend="torch")
        monkeypatch.setenv("LINMIX_FORCE_REFERENCE", "1")
        shifted_mixes(x, 3, 5, mu)
    monkeypatch.delenv("LINMIX_FORCE_REFERENCE")
    shifted_mixes(x.requires_grad_(), 3, 5, mu)  # autograd: the kernel is forward only
    assert calls == [1]


def test_errors_name_what_was_expected():
    x = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match=r"T = height \* width = 2 \* 4 = 8"):
        q_shift(x, 2, 4)
    with pytest.raises(ValueError, match=r"T = height \* width"):
        q_shift_reference(x, 3, 3)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        q_shift(x, 0, 6)
    with pytest.raises(ValueError, match="form must be one of"):
        q_shift(x, 2, 3, form="roll")
    with pytest.raises(ValueError, match=r"mixes\[1\] must have shape \[C\] = \[8\]"):
        shifted_mixes(x, 2, 3, torch.rand(8), torch.rand(7))
    with pytest.raises(ValueError, match="at least one mix"):
        shifted_mixes(x, 2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        shifted_mixes(x, 2, 3, torch.rand(8), backend="triton")
    with pytest.raises(ValueError, match="backend='native' needs .*no autograd"):
        shifted_mixes(x.requires_grad_(), 2, 3, torch.rand(8), backend="native")
