"""WKV: the O(T) bidirectional form and the chunked / step causal forms against the fp64 oracles."""

import pytest
import torch

from helpers import TOLERANCE, assert_close_rms, rms_relative_error
from linmix.ops.wkv import (
    WKVState,
    bi_wkv,
    bi_wkv_reference,
    causal_wkv,
    causal_wkv_reference,
    causal_wkv_step,
)

SPEC_DECAYS = [-5.0, 0.0, 3.0, 20.0]  # the spec's w values, passed as w / T


def _double(*tensors):
    return [t.detach().double() for t in tensors]


def _bi_inputs(length, batch=2, channels=7, *, key_scale=1.0):
    """One channel per spec decay, the rest random; w and u divided by T as Vision-RWKV does."""
    extra = channels - len(SPEC_DECAYS)
    w = torch.tensor(SPEC_DECAYS + (3 * torch.randn(extra)).tolist()) / length
    u = 2 * torch.randn(channels) / length
    k = key_scale * torch.randn(batch, length, channels)
    v = torch.randn(batch, length, channels)
    return w, u, k, v


def _max_relative_error(actual, w, u, k, v, reference=bi_wkv_reference):
    """max_t |y - y_ref| / (the same weighted mean of |v|): an elementwise relative error that stays
    meaningful where y itself is near 0 through cancellation."""
    expected = reference(*_double(w, u, k, v))
    scale = reference(*_double(w, u, k, v.abs()))
    return float(((actual.double() - expected).abs() / scale.clamp_min(1e-300)).max())


def _assert_grads_close(actual, expected, tolerance, what):
    for name, a, e in zip("wukv", actual, expected):
        if float(e.abs().max()) == 0.0:  # e.g. dy/dw is exactly 0 when T <= 2
            assert float(a.abs().max()) <= tolerance, f"{what} d/d{name} should be 0, got {float(a.abs().max()):.2e}"
        else:
            assert_close_rms(a, e, tolerance, f"{what} d/d{name}")


def _grads(fn, inputs, cotangent):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    (fn(*leaves) * cotangent.to(leaves[2].dtype)).sum().backward()
    return [t.grad for t in leaves]


# --------------------------------------------------------------------------------------------------
# bidirectional


FORMS = ["one_shift", "chunked"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("length", [1, 2, 15, 64, 1024])
def test_bi_wkv_matches_reference_fp32(length, form):
    w, u, k, v = _bi_inputs(length)
    y = bi_wkv(w, u, k, v, form=form)
    assert y.dtype == torch.float32 and y.shape == k.shape
    assert_close_rms(y, bi_wkv_reference(*_double(w, u, k, v)), 2e-6, f"bi_wkv T={length}")
    assert _max_relative_error(y, w, u, k, v) <= 3e-6


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("length", [4096])
def test_bi_wkv_matches_reference_long(length, form):
    w, u, k, v = _bi_inputs(length, batch=1, channels=9)
    y = bi_wkv(w, u, k, v, form=form)
    assert_close_rms(y, bi_wkv_reference(*_double(w, u, k, v)), 2e-6, f"bi_wkv T={length}")
    assert _max_relative_error(y, w, u, k, v) <= 3e-6


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 300])
def test_bi_wkv_chunk_sizes(chunk_size):
    w, u, k, v = _bi_inputs(200, key_scale=3.0)
    y = bi_wkv(w, u, k, v, chunk_size=chunk_size, form="chunked")
    assert_close_rms(y, bi_wkv_reference(*_double(w, u, k, v)), 2e-6, f"chunk_size={chunk_size}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("length", [2, 15, 100])
def test_bi_wkv_fp64_is_exact(length, form):
    w, u, k, v = _double(*_bi_inputs(length))
    y = bi_wkv(w, u, k, v, chunk_size=8, form=form)
    assert y.dtype == torch.float64
    assert_close_rms(y, bi_wkv_reference(w, u, k, v), 1e-12, "fp64")


def test_bi_wkv_large_per_token_decay_with_small_chunks():
    # Not divided by T: |w| up to 20 per token. Small chunks keep the in-chunk span small.
    length = 150
    w, u, k, v = _bi_inputs(length)
    w, u = w * length, u * length
    expected = bi_wkv_reference(*_double(w, u, k, v))
    assert_close_rms(bi_wkv(w, u, k, v, chunk_size=2), expected, 1e-5, "per-token |w| <= 20, chunk 2")
    assert torch.isfinite(bi_wkv(w, u, k, v)).all()  # the default chunk is inexact here, but finite


def test_bi_wkv_bf16_and_fp16():
    w, u, k, v = _bi_inputs(200)
    for dtype in (torch.bfloat16, torch.float16):
        kh, vh = k.to(dtype), v.to(dtype)
        y = bi_wkv(w, u, kh, vh)
        assert y.dtype == dtype
        assert_close_rms(y, bi_wkv_reference(*_double(w, u, kh, vh)), TOLERANCE[dtype], f"{dtype}")


def test_bi_wkv_large_inputs_stay_finite():
    length = 4096
    w = torch.tensor([-30.0, -5.0, 0.0, 3.0, 20.0, 60.0])
    k = 40 * torch.randn(1, length, 6)
    v = torch.randn(1, length, 6)
    for scale in (1.0 / length, 1.0):  # the spec's w / T, and w per token (T |w| up to 2.5e5)
        y = bi_wkv(w * scale, w * scale, k, v)
        assert torch.isfinite(y).all()
        assert float(y.abs().max()) <= float(v.abs().max()) * (1 + 1e-5)  # a weighted mean of v


def test_bi_wkv_masked_keys():
    w, u, k, v = _bi_inputs(50)
    k[0, :20] = float("-inf")
    k[1, 10:] = float("-inf")
    k.requires_grad_()
    y = bi_wkv(w, u, k, v, chunk_size=8)
    assert torch.isfinite(y).all()
    assert_close_rms(y, bi_wkv_reference(*_double(w, u, k, v)), 2e-6, "masked keys")
    y.sum().backward()
    assert torch.isfinite(k.grad).all()
    empty = bi_wkv(w, u, torch.full((1, 5, 7), float("-inf")), torch.randn(1, 5, 7))
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.mark.parametrize("length", [1, 2, 15, 64])
def test_bi_wkv_gradients_match_reference(length):
    inputs = _bi_inputs(length)
    cotangent = torch.randn_like(inputs[2])
    expected = _grads(bi_wkv_reference, _double(*inputs), cotangent.double())
    chunked = lambda *args: bi_wkv(*args, chunk_size=8, form="chunked")  # several chunks for T = 15, 64
    _assert_grads_close(_grads(chunked, inputs, cotangent), expected, 2e-6, f"fp32 T={length}")
    _assert_grads_close(_grads(chunked, _double(*inputs), cotangent), expected, 1e-12, f"fp64 T={length}")


def test_bi_wkv_gradcheck():
    w, u, k, v = (t.requires_grad_() for t in _double(*_bi_inputs(7, batch=1, channels=5)))
    assert torch.autograd.gradcheck(lambda *args: bi_wkv(*args, chunk_size=3, form="chunked"), (w * 7, u, k, v))
    assert torch.autograd.gradcheck(lambda *args: bi_wkv(*args, chunk_size=3, form="one_shift"), (w, u, k, v))


def test_bi_wkv_auto_form_picks_one_shift_only_where_exact(monkeypatch):
    import linmix.ops.wkv_chunked as forms_module

    calls = []
    real = forms_module.bi_wkv_one_shift
    monkeypatch.setattr(forms_module, "bi_wkv_one_shift", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    w, u, k, v = _bi_inputs(50)
    bi_wkv(w, u, k, v, backend="torch")  # Vision-RWKV decays: (T - 1) |w| <= 20
    assert calls == [1]
    bi_wkv(w * 50, u, k, v, chunk_size=1, backend="torch")  # per-token |w| up to 20: only the chunked form is exact
    assert calls == [1]
    with pytest.raises(ValueError, match="form must be one of"):
        bi_wkv(w, u, k, v, form="fast")


def test_bi_wkv_exports_with_dynamic_length():
    """No Python loop over T: one torch.export graph serves other lengths."""

    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6))
            self.u = torch.nn.Parameter(torch.randn(6))

        def forward(self, k, v):
            return bi_wkv(self.w / k.shape[1], self.u / k.shape[1], k, v, chunk_size=16)

    module = Mixer()
    length = torch.export.Dim.AUTO
    program = torch.export.export(module, (torch.randn(1, 40, 6), torch.randn(1, 40, 6)), dynamic_shapes={"k": {1: length}, "v": {1: length}})
    for t in (17, 53, 130):  # several chunks (a length of one chunk is specialised away by export)
        k, v = torch.randn(1, t, 6), torch.randn(1, t, 6)
        with torch.no_grad():
            assert_close_rms(program.module()(k, v), module(k, v), 1e-6, f"exported T={t}")


@pytest.mark.slow  # about 10 s of export
def test_bi_wkv_onnx_export(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")

    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6))
            self.u = torch.nn.Parameter(torch.randn(6))

        def forward(self, k, v):
            return bi_wkv(self.w / k.shape[1], self.u / k.shape[1], k, v)

    module = Mixer()
    length = torch.export.Dim.AUTO
    program = torch.onnx.export(module, (torch.randn(2, 100, 6), torch.randn(2, 100, 6)),
                                dynamic_shapes={"k": {1: length}, "v": {1: length}}, dynamo=True)
    path = tmp_path / "bi_wkv.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    for t in (1, 64, 65, 700):
        k, v = torch.randn(2, t, 6), torch.randn(2, t, 6)
        out = torch.from_numpy(session.run(None, {names[0]: k.numpy(), names[1]: v.numpy()})[0])
        expected = bi_wkv_reference(module.w.detach().double() / t, module.u.detach().double() / t, k.double(), v.double())
        assert_close_rms(out, expected, 2e-6, f"onnxruntime T={t}")


@pytest.mark.parametrize("fn", [bi_wkv, bi_wkv_reference, causal_wkv, causal_wkv_reference])
def test_bad_inputs_raise(fn):
    k = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"w must have shape \[C\] = \[7\]"):
        fn(torch.randn(6), torch.randn(7), k, k)
    with pytest.raises(ValueError, match=r"u must have shape \[C\] = \[7\]"):
        fn(torch.randn(7), torch.randn(7, 1), k, k)
    with pytest.raises(ValueError, match=r"k must have shape \[B, T, C\]"):
        fn(torch.randn(7), torch.randn(7), k[0], k[0])
    with pytest.raises(ValueError, match=r"k, v must agree in shape \[B, T, C\]"):
        fn(torch.randn(7), torch.randn(7), k, k[:, :4])
    with pytest.raises(ValueError, match=r"v must be a floating-point tensor of shape \[B, T, C\]"):
        fn(torch.randn(7), torch.randn(7), k, k.long())


def test_bad_chunk_size_raises():
    w, u, k, v = _bi_inputs(5)
    for fn in (bi_wkv, causal_wkv):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            fn(w, u, k, v, chunk_size=0)


# --------------------------------------------------------------------------------------------------
# causal


def _causal_inputs(length, batch=2, channels=7, *, key_scale=2.0):
    """RWKV-4 decays: w = exp(time_decay), time_decay spread over the init range [-5, 3]."""
    w = torch.exp(torch.linspace(-5.0, 3.0, channels))
    u = torch.randn(channels)
    k = key_scale * torch.randn(batch, length, channels)
    v = torch.randn(batch, length, channels)
    return w, u, k, v


def _state_value(state):
    """The sums a state stands for: exp(p) (a, b), in fp64."""
    scale = state.p.double().exp()
    return torch.stack([state.a.double() * scale, state.b.double() * scale])


def _run_steps(w, u, k, v, state=None):
    state = state if state is not None else WKVState.empty(k.shape[0], k.shape[2])
    outputs = []
    for t in range(k.shape[1]):
        y_t, state = causal_wkv_step(state, w, u, k[:, t], v[:, t])
        outputs.append(y_t)
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize("length", [1, 15, 63, 500])
@pytest.mark.parametrize("chunk_size", [7, 16])
def test_causal_wkv_matches_reference_fp32(length, chunk_size):
    w, u, k, v = _causal_inputs(length)
    y = causal_wkv(w, u, k, v, chunk_size=chunk_size)
    assert y.dtype == torch.float32 and y.shape == k.shape
    assert_close_rms(y, causal_wkv_reference(*_double(w, u, k, v)), 2e-6, f"causal T={length}")
    assert _max_relative_error(y, w, u, k, v, causal_wkv_reference) <= 3e-6


def test_causal_wkv_fp64_is_exact():
    w, u, k, v = _double(*_causal_inputs(70))
    assert_close_rms(causal_wkv(w, u, k, v, chunk_size=16), causal_wkv_reference(w, u, k, v), 1e-12, "fp64")


@pytest.mark.parametrize("length", [1, 15, 63, 500])
def test_causal_steps_equal_whole(length):
    w, u, k, v = _causal_inputs(length)
    with torch.no_grad():
        whole, final = causal_wkv(w, u, k, v, return_state=True)
        stepped, state = _run_steps(w, u, k, v)
    assert_close_rms(stepped, causal_wkv_reference(*_double(w, u, k, v)), 1e-5, "steps vs reference")
    assert_close_rms(stepped, whole, 1e-5, "steps vs whole")
    # The token-by-token recurrence rounds once per token: its sums drift ~T eps (the chunked form's
    # stay within ~1e-7 of fp64); their ratio, the output, does not.
    assert_close_rms(_state_value(state), _state_value(final), max(1e-5, 1e-7 * length), "final state")


@pytest.mark.parametrize("split", [1, 16, 37])
def test_causal_state_continuation(split):
    w, u, k, v = _causal_inputs(80)
    whole, final = causal_wkv(w, u, k, v, return_state=True)
    head, state = causal_wkv(w, u, k[:, :split], v[:, :split], return_state=True)
    tail, state = causal_wkv(w, u, k[:, split:], v[:, split:], state, return_state=True)
    assert_close_rms(torch.cat([head, tail], dim=1), whole, 1e-6, "chunked calls vs whole")
    assert_close_rms(_state_value(state), _state_value(final), 1e-6, "final state")
    with torch.no_grad():  # prefill then decode
        _, state = causal_wkv(w, u, k[:, :split], v[:, :split], return_state=True)
        stepped, _ = _run_steps(w, u, k[:, split:], v[:, split:], state)
    assert_close_rms(stepped, whole[:, split:], 1e-5, "prefill + steps vs whole")


def test_causal_masked_keys_leading():
    """-inf keys contribute nothing and give no NaN, also when the first tokens are all masked."""
    w, u, k, v = _causal_inputs(40)
    k[:, :20] = float("-inf")
    k[1, 25:28] = float("-inf")
    k.requires_grad_()
    y, state = causal_wkv(w, u, k, v, return_state=True, chunk_size=8)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, :20], torch.zeros_like(y[:, :20]))  # nothing seen yet: 0
    assert_close_rms(y, causal_wkv_reference(*_double(w, u, k, v)), 2e-6, "masked keys")
    y.sum().backward()
    assert torch.isfinite(k.grad).all() and torch.equal(k.grad[:, :20], torch.zeros_like(k.grad[:, :20]))
    with torch.no_grad():
        stepped, step_state = _run_steps(w, u, k, v)
    assert torch.isfinite(stepped).all()
    assert_close_rms(stepped, y, 1e-5, "steps with masked keys")
    assert_close_rms(_state_value(step_state), _state_value(state), 1e-5, "state with masked keys")


def test_causal_mask_removes_tokens():
    """With mask, padded (or holed) tokens are as if absent: outputs and state of the real tokens alone."""
    w, u, k, v = _causal_inputs(30, batch=1)
    noise_k, noise_v = 5 * torch.randn(1, 30, 7), torch.randn(1, 30, 7)
    real = torch.zeros(30, dtype=torch.bool)
    real[torch.tensor([0, 2, 3, 9, 10, 11, 12, 17, 18, 29])] = True  # holes, and a left pad of none
    keys, values = noise_k.clone(), noise_v.clone()
    keys[0, real], values[0, real] = k[0, : int(real.sum())], v[0, : int(real.sum())]
    n = int(real.sum())
    alone, alone_state = causal_wkv(w, u, k[:, :n], v[:, :n], return_state=True)
    # Left padding on a second row, then a continued call with more padding.
    padded_k = torch.cat([noise_k[:, :6], k[:, :n]], dim=1)
    padded_v = torch.cat([noise_v[:, :6], v[:, :n]], dim=1)
    left = torch.cat([torch.zeros(6, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    for keys_, values_, mask in ((keys, values, real), (padded_k, padded_v, left)):
        y, state = causal_wkv(w, u, keys_, values_, return_state=True, mask=mask[None], chunk_size=4)
        assert torch.isfinite(y).all()
        assert_close_rms(y[:, mask], alone, 1e-6, "masked vs alone")
        assert_close_rms(_state_value(state), _state_value(alone_state), 1e-6, "state masked vs alone")
    head, state = causal_wkv(w, u, k[:, :4], v[:, :4], return_state=True)
    tail_k = torch.cat([noise_k[:, :5], k[:, 4:n]], dim=1)
    tail_v = torch.cat([noise_v[:, :5], v[:, 4:n]], dim=1)
    tail_mask = torch.cat([torch.zeros(5, dtype=torch.bool), torch.ones(n - 4, dtype=torch.bool)])[None]
    tail, state = causal_wkv(w, u, tail_k, tail_v, state, return_state=True, mask=tail_mask)
    assert_close_rms(torch.cat([head, tail[:, 5:]], dim=1), alone, 1e-6, "continued call with padding")
    assert_close_rms(_state_value(state), _state_value(alone_state), 1e-6, "continued state with padding")


def test_causal_bf16():
    w, u, k, v = _causal_inputs(100)
    kh, vh = k.bfloat16(), v.bfloat16()
    y, state = causal_wkv(w, u, kh, vh, return_state=True)
    assert y.dtype == torch.bfloat16 and state.a.dtype == torch.float32
    assert_close_rms(y, causal_wkv_reference(*_double(w, u, kh, vh)), TOLERANCE[torch.bfloat16], "bf16")
    y_t, step_state = causal_wkv_step(WKVState.empty(2, 7), w, u, kh[:, 0], vh[:, 0])
    assert y_t.dtype == torch.bfloat16 and step_state.a.dtype == torch.float32


@pytest.mark.parametrize("length", [1, 15, 40])
def test_causal_gradients_match_reference(length):
    inputs = _causal_inputs(length)
    cotangent = torch.randn_like(inputs[2])
    expected = _grads(causal_wkv_reference, _double(*inputs), cotangent.double())
    chunked = lambda *args: causal_wkv(*args, chunk_size=8)
    _assert_grads_close(_grads(chunked, inputs, cotangent), expected, 2e-6, f"fp32 T={length}")
    _assert_grads_close(_grads(chunked, _double(*inputs), cotangent), expected, 1e-12, f"fp64 T={length}")


def test_causal_gradients_through_state():
    """Gradients flow through a carried state (a, b) and through the step form."""
    inputs = _causal_inputs(20)
    cotangent = torch.randn_like(inputs[2])
    expected = _grads(causal_wkv_reference, _double(*inputs), cotangent.double())

    def split_calls(w, u, k, v):
        head, state = causal_wkv(w, u, k[:, :9], v[:, :9], return_state=True, chunk_size=4)
        return torch.cat([head, causal_wkv(w, u, k[:, 9:], v[:, 9:], state, chunk_size=4)], dim=1)

    def steps(w, u, k, v):
        return _run_steps(w, u, k, v, WKVState.empty(2, 7, dtype=k.dtype))[0]

    _assert_grads_close(_grads(split_calls, _double(*inputs), cotangent), expected, 1e-12, "split calls")
    _assert_grads_close(_grads(steps, _double(*inputs), cotangent), expected, 1e-12, "steps")


def test_causal_gradcheck():
    w, u, k, v = (t.requires_grad_() for t in _double(*_causal_inputs(9, batch=1, channels=4)))
    assert torch.autograd.gradcheck(lambda *args: causal_wkv(*args, chunk_size=4), (w, u, k, v))


def test_causal_step_updates_in_place_only_without_autograd():
    w, u, k, v = _causal_inputs(2)
    state = WKVState.empty(2, 7)
    tensors = state.tensors()
    with torch.no_grad():
        _, same = causal_wkv_step(state, w, u, k[:, 0], v[:, 0])
    assert same is state and all(a is b for a, b in zip(same.tensors(), tensors))
    saved = state.clone()
    _, new = causal_wkv_step(saved, w, u, k[:, 1], v[:, 1])
    assert new is not saved and all(a is not b for a, b in zip(new.tensors(), saved.tensors()))


def test_causal_empty_sequence_keeps_state():
    w, u, k, v = _causal_inputs(5)
    _, state = causal_wkv(w, u, k, v, return_state=True)
    y, same = causal_wkv(w, u, k[:, :0], v[:, :0], state, return_state=True)
    assert y.shape == (2, 0, 7)
    assert torch.equal(_state_value(same), _state_value(state))


def test_causal_bad_state_and_mask_raise():
    w, u, k, v = _causal_inputs(5)
    with pytest.raises(ValueError, match=r"state.a must have shape \[B, C\] = \[2, 7\]"):
        causal_wkv(w, u, k, v, WKVState.empty(3, 7))
    with pytest.raises(ValueError, match=r"state must be a WKVState"):
        causal_wkv(w, u, k, v, (1, 2, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\] = \(2, 5\)"):
        causal_wkv(w, u, k, v, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"k_t must have shape \[B, C\]"):
        causal_wkv_step(WKVState.empty(2, 7), w, u, k, v)
    with pytest.raises(ValueError, match=r"w must have shape \[C\] = \[7\]"):
        causal_wkv_step(WKVState.empty(2, 7), w[:3], u, k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match=r"state.p must have shape \[B, C\] = \[2, 7\]"):
        state = WKVState.empty(2, 7)
        state.p = state.p[:, :3]
        causal_wkv_step(state, w, u, k[:, 0], v[:, 0])
