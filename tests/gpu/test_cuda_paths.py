"""The GPU paths on a real CUDA device (marked ``gpu``: skipped on CPU-only machines and in CI).

The interpreter tests (tests/ops/test_triton_*.py) check the kernels' arithmetic everywhere; these
check what only a GPU shows: the compiled kernels, the dispatch that "auto" makes for CUDA tensors,
the compiled FlexAttention path and CUDA-graph replay.
"""

import pytest
import torch

from helpers import TOLERANCE, assert_close_rms

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def test_auto_dispatch_uses_the_kernels_on_cuda(monkeypatch):
    pytest.importorskip("triton")
    import linmix.ops.triton.bi_wkv as bi_wkv_kernels
    import linmix.ops.triton.taylor_step as step_kernels
    from linmix.ops import LinearAttentionState, bi_wkv, linear_attention_step
    from linmix.ops.feature_maps import taylor_feature_dim

    used = []
    real_step, real_wkv = step_kernels.taylor_linear_attention_step, bi_wkv_kernels.bi_wkv_triton
    monkeypatch.setattr(step_kernels, "taylor_linear_attention_step", lambda *a, **k: used.append("step") or real_step(*a, **k))
    monkeypatch.setattr(bi_wkv_kernels, "bi_wkv_triton", lambda *a, **k: used.append("wkv") or real_wkv(*a, **k))
    state = LinearAttentionState.empty(2, 3, taylor_feature_dim(16), 64, device=CUDA)
    q, k, v = torch.randn(2, 3, 16, device=CUDA), torch.randn(2, 3, 16, device=CUDA), torch.randn(2, 3, 64, device=CUDA)
    linear_attention_step(state, q, k, v)
    bi_wkv(torch.randn(8, device=CUDA), torch.randn(8, device=CUDA), torch.randn(1, 50, 8, device=CUDA), torch.randn(1, 50, 8, device=CUDA))
    assert used == ["step", "wkv"]
    monkeypatch.setenv("LINMIX_FORCE_REFERENCE", "1")
    linear_attention_step(state, q, k, v)
    assert used == ["step", "wkv"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_equal_references(dtype):
    pytest.importorskip("triton")
    from linmix.ops import LinearAttentionState, bi_wkv, bi_wkv_reference, linear_attention_step
    from linmix.ops.feature_maps import taylor_feature_dim

    state = LinearAttentionState.empty(4, 16, taylor_feature_dim(16), 112, device=CUDA)
    state.kv.normal_()
    state.k_sum.uniform_(1, 3)
    reference = state.clone()
    q, k = (torch.randn(4, 16, 16, device=CUDA).to(dtype) for _ in range(2))
    v = torch.randn(4, 16, 112, device=CUDA).to(dtype)
    expected, _ = linear_attention_step(reference, q, k, v, backend="torch")
    actual, _ = linear_attention_step(state, q, k, v, backend="triton")
    assert_close_rms(actual, expected, TOLERANCE[dtype])
    assert_close_rms(state.kv, reference.kv, 1e-6)

    length, channels = 700, 96
    w, u = torch.randn(channels, device=CUDA) * 3 / length, torch.randn(channels, device=CUDA) / length
    k, v = (torch.randn(2, length, channels, device=CUDA).to(dtype) for _ in range(2))
    assert_close_rms(bi_wkv(w, u, k, v, backend="triton"), bi_wkv_reference(w, u, k, v), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_sliding_window(dtype):
    from linmix.ops import sliding_window_attention, sliding_window_attention_reference

    q, k, v = (torch.randn(2, 1000, 4, 64, device=CUDA).to(dtype) for _ in range(3))
    mask = torch.ones(2, 1000, dtype=torch.bool, device=CUDA)
    mask[1, :300] = False
    for key_padding_mask in (None, mask):
        actual = sliding_window_attention(q, k, v, window=128, key_padding_mask=key_padding_mask)  # auto: flex on CUDA
        expected = sliding_window_attention_reference(q.double(), k.double(), v.double(), window=128, key_padding_mask=key_padding_mask)
        assert_close_rms(actual, expected, TOLERANCE[dtype])


def test_cuda_graph_decode_equals_eager_generate():
    from linmix.lm import BasedForCausalLM, preset
    from linmix.lm.cuda_graph import generate_greedy

    torch.manual_seed(0)
    model = BasedForCausalLM(preset("based-tiny")).to(CUDA).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4.0)
    prompt = torch.randint(0, 256, (3, 9), device=CUDA)
    expected = model.generate(prompt, 40)
    actual = generate_greedy(model, prompt, 40)  # captured graph, replayed 39 times
    assert torch.equal(actual, expected)
