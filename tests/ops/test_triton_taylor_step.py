"""The fused Triton linear-attention decode step equals the torch step (and so the whole-sequence form).

Without a GPU the kernel runs on CPU tensors in Triton's interpreter: TRITON_INTERPRET=1 is set here,
before linmix's kernels are first imported (they are imported lazily, on first use).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import TOLERANCE, assert_close_rms  # noqa: E402
from linmix.ops import LinearAttentionState, linear_attention, linear_attention_step  # noqa: E402
from linmix.ops import dispatch  # noqa: E402
from linmix.ops.feature_maps import taylor_feature_dim, taylor_feature_map  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_state(batch, heads, expanded, value_dim):
    state = LinearAttentionState.empty(batch, heads, expanded, value_dim, device=DEVICE)
    state.kv.normal_()
    state.k_sum.uniform_(1.0, 3.0)  # a state after some tokens: positive denominators
    return state


@pytest.mark.parametrize("feature_map", ["taylor", "taylor_full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_dim, value_dim", [(16, 40), (5, 7)])
def test_fused_step_equals_torch_step(feature_map, dtype, feature_dim, value_dim):
    batch, heads = 2, 3
    expanded = taylor_feature_dim(feature_dim, symmetric=feature_map == "taylor")
    torch_state = _random_state(batch, heads, expanded, value_dim)
    kernel_state = torch_state.clone()
    q, k = (torch.randn(batch, heads, feature_dim, device=DEVICE).to(dtype) for _ in range(2))
    v = torch.randn(batch, heads, value_dim, device=DEVICE).to(dtype)
    expected, _ = linear_attention_step(torch_state, q, k, v, feature_map=feature_map, backend="torch")
    actual, returned = linear_attention_step(kernel_state, q, k, v, feature_map=feature_map, backend="triton")
    assert returned is kernel_state and actual.dtype == dtype and actual.shape == (batch, heads, value_dim)
    assert_close_rms(actual, expected, TOLERANCE[dtype], "y_t")
    # The state is fp32 whatever the inputs, and updated in place identically.
    assert_close_rms(kernel_state.kv, torch_state.kv, 1e-6, "kv")
    assert_close_rms(kernel_state.k_sum, torch_state.k_sum, 1e-6, "k_sum")


def test_fused_features_follow_the_taylor_map_row_order():
    """A state built by the kernel from zero equals sum phi(k) (x) v with phi the op's feature map."""
    from linmix.ops.triton.taylor_step import taylor_feature_table

    x = torch.randn(4, 6, dtype=torch.float64)
    first, second, scale = (t.cpu() for t in taylor_feature_table(6, True, "cpu"))
    pick = lambda index: torch.where(index >= 0, x[:, index.clamp(min=0).long()], torch.ones(()).double())  # noqa: E731
    assert torch.allclose(pick(first) * pick(second) * scale.double(), taylor_feature_map(x), atol=1e-6)


def test_fused_steps_continue_the_whole_sequence_form():
    """Prefill with the chunked form, then decode with the kernel: equals the whole sequence at once."""
    batch, length, heads, feature_dim, value_dim, prompt = 1, 9, 2, 8, 12, 5
    q, k = (torch.randn(batch, length, heads, feature_dim, device=DEVICE) * 0.5 for _ in range(2))
    v = torch.randn(batch, length, heads, value_dim, device=DEVICE)
    whole = linear_attention(q, k, v, backend="torch")
    _, state = linear_attention(q[:, :prompt], k[:, :prompt], v[:, :prompt], return_final_state=True, backend="torch")
    steps = [linear_attention_step(state, q[:, t], k[:, t], v[:, t], backend="triton")[0] for t in range(prompt, length)]
    assert_close_rms(torch.stack(steps, dim=1), whole[:, prompt:], 1e-5, "decoded tokens")


def test_backend_triton_rejects_ineligible_inputs():
    q = k = torch.randn(1, 2, 4, device=DEVICE)
    v = torch.randn(1, 2, 3, device=DEVICE)
    expanded = taylor_feature_dim(4)
    with pytest.raises(ValueError, match="backend='triton' needs"):
        linear_attention_step(LinearAttentionState.empty(1, 2, 5, 3, device=DEVICE), q, k, v,
                              feature_map=lambda x: torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1), backend="triton")
    with pytest.raises(ValueError, match="fp32 state"):
        linear_attention_step(LinearAttentionState.empty(1, 2, expanded, 3, device=DEVICE, dtype=torch.float64), q, k, v, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_attention_step(LinearAttentionState.empty(1, 2, expanded, 3, device=DEVICE), q, k, v, backend="cuda")


def test_autograd_stays_on_the_torch_path():
    """The kernel has no backward: with inputs that need gradients "auto" takes the torch step."""
    q = torch.randn(1, 2, 4, device=DEVICE, requires_grad=True)
    k, v = torch.randn(1, 2, 4, device=DEVICE), torch.randn(1, 2, 3, device=DEVICE)
    state = LinearAttentionState.empty(1, 2, taylor_feature_dim(4), 3, device=DEVICE)
    y, _ = linear_attention_step(state, q, k, v)
    y.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="no autograd"):
        linear_attention_step(state, q, k, v, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dispatch")
def test_cpu_auto_never_launches_the_kernel(monkeypatch):
    import linmix.ops.triton.taylor_step as kernel_module

    monkeypatch.setattr(kernel_module, "taylor_linear_attention_step", lambda *a, **k: pytest.fail("kernel used for CPU auto"))
    state = LinearAttentionState.empty(1, 2, taylor_feature_dim(4), 3)
    linear_attention_step(state, torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 3))


def test_force_reference_environment_variable(monkeypatch):
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1")
    assert dispatch.reference_forced()
    x = torch.randn(2, device=DEVICE)
    assert not dispatch.use_triton("auto", x, eligible=True, why_not="")
    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "0")
    assert not dispatch.reference_forced()
    assert dispatch.use_triton("auto", x, eligible=True, why_not="") == x.is_cuda


def test_strided_inputs_and_state():
    """Views (a slice of a packed projection, a state that is a slice of a larger buffer) are read
    through their strides, not assumed contiguous."""
    batch, heads, feature_dim, value_dim = 2, 3, 6, 10
    expanded = taylor_feature_dim(feature_dim)
    packed = torch.randn(batch, heads, 2 * feature_dim + value_dim, device=DEVICE)
    q, k, v = packed[..., :feature_dim], packed[..., feature_dim:2 * feature_dim], packed[..., 2 * feature_dim:]
    buffer = torch.randn(batch, heads, expanded, value_dim + 3, device=DEVICE)
    state = LinearAttentionState(kv=buffer[..., :value_dim], k_sum=torch.rand(batch, heads, 2 * expanded, device=DEVICE)[..., ::2] + 1)
    reference = LinearAttentionState(kv=state.kv.clone(), k_sum=state.k_sum.clone())
    expected, _ = linear_attention_step(reference, q, k, v, backend="torch")
    actual, _ = linear_attention_step(state, q, k, v, backend="triton")
    assert_close_rms(actual, expected, 1e-5)
    assert_close_rms(buffer[..., :value_dim], reference.kv, 1e-6, "kv written in place through the view")
    assert_close_rms(state.k_sum, reference.k_sum, 1e-6)
