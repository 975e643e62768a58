"""The native CPU kernels (linmix.ops.native): Bi-WKV scans and the fused token shift + mixes,
against the fp64 oracle and the torch paths; dispatch; the build and its fallbacks."""

import os

import pytest
import torch

from helpers import assert_close_rms
from linmix.layers.vision_rwkv import VRWKVBlock
from linmix.ops import native
from linmix.ops.q_shift import q_shift, shifted_mixes
from linmix.ops.wkv import bi_wkv, bi_wkv_reference

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")

SPEC_DECAYS = [-5.0, 0.0, 3.0, 20.0]  # raw decays; Vision-RWKV passes w / T


def _inputs(length, batch=2, channels=37, *, key_scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    extra = channels - len(SPEC_DECAYS)
    w = torch.tensor(SPEC_DECAYS + (3 * torch.randn(extra, generator=generator)).clamp(-20, 20).tolist()) / length
    u = 2 * torch.randn(channels, generator=generator) / length
    k = key_scale * torch.randn(batch, length, channels, generator=generator)
    v = torch.randn(batch, length, channels, generator=generator)
    return w, u, k, v


def _reference(w, u, k, v):
    return bi_wkv_reference(*(t.double() for t in (w, u, k, v)))


@pytest.mark.parametrize("length", [1, 2, 15, 64, 65, 1024, 4096])
def test_bi_wkv_native_matches_the_fp64_oracle(length):
    # 37 channels: slices of 16 plus a ragged one; T = 65 leaves a one-row last time block.
    w, u, k, v = _inputs(length, batch=1 if length > 1024 else 2, channels=37 if length <= 1024 else 20, key_scale=3.0)
    y = native.bi_wkv_native(w, u, k, v)
    assert y.shape == k.shape and y.dtype == torch.float32
    assert_close_rms(y, _reference(w, u, k, v), 2e-6, f"T={length}")


def test_bi_wkv_native_gate_is_sigmoid_times_the_sum():
    w, u, k, v = _inputs(130, batch=2, channels=21, key_scale=2.0)
    gate = 8 * torch.randn(k.shape, generator=torch.Generator().manual_seed(3))  # saturates both ways
    y = native.bi_wkv_native(w, u, k, v, gate=gate)
    assert_close_rms(y, torch.sigmoid(gate.double()) * _reference(w, u, k, v), 2e-6, "gated")


def test_channel_mix_elementwise_kernels_match_torch():
    generator = torch.Generator().manual_seed(4)
    x = 5 * torch.randn(3, 50, 70, generator=generator)
    x[0, 0, :3] = torch.tensor([0.0, -0.0, -1e-30])
    expected = torch.square(torch.relu(x))
    assert native.relu_square_(x) is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    gate = 30 * torch.randn(3, 50, 70, generator=generator)
    gate[0, 0, :4] = torch.tensor([100.0, -100.0, 0.0, -88.0])
    y = torch.randn(3, 50, 70, generator=generator)
    expected = torch.sigmoid(gate) * y
    native.sigmoid_mul_(y, gate)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-30)
    with pytest.raises(ValueError, match="contiguous"):
        native.relu_square_(torch.zeros(4, 6).t())
    with pytest.raises(ValueError, match="same shape"):
        native.sigmoid_mul_(torch.zeros(4), torch.zeros(5))


def test_bi_wkv_native_masked_keys_and_all_masked_channels():
    w, u, k, v = _inputs(70, batch=1, channels=9)
    k[:, 5:40] = float("-inf")
    k[:, :, 3] = float("-inf")  # channel 3 has no key at all: its output is 0
    y = native.bi_wkv_native(w, u, k, v)
    assert torch.equal(y[..., 3], torch.zeros_like(y[..., 3]))
    keep = [c for c in range(9) if c != 3]
    assert_close_rms(y[..., keep], _reference(w, u, k, v)[..., keep], 2e-6, "masked")


def test_bi_wkv_native_widely_spread_keys():
    length, channels = 300, 4
    w, u = torch.zeros(channels), torch.full((channels,), -30.0 / length)
    generator = torch.Generator().manual_seed(1)
    k = 10 * torch.randn(1, length, channels, generator=generator)
    v = torch.randn(1, length, channels, generator=generator)
    assert_close_rms(native.bi_wkv_native(w, u, k, v), _reference(w, u, k, v), 2e-6, "spread keys")


def test_bi_wkv_native_is_the_same_for_any_thread_count_and_input_layout():
    w, u, k, v = _inputs(200, batch=3, channels=100)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(native.bi_wkv_native(w, u, k, v))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    # Non-contiguous k, v (a transposed view) give the same values.
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(native.bi_wkv_native(w, u, k_t, v), results[0])


def test_bi_wkv_auto_dispatch_uses_native_only_where_it_applies(monkeypatch):
    import linmix.ops.wkv as wkv_module

    calls = []
    real = native.bi_wkv_native
    monkeypatch.setattr(native, "bi_wkv_native", lambda *a: calls.append(1) or real(*a))
    w, u, k, v = _inputs(50)
    with torch.no_grad():
        y = bi_wkv(w, u, k, v)
    assert calls == [1]
    assert_close_rms(y, bi_wkv(w, u, k, v, backend="torch"), 1e-6, "native vs one-shift")
    bi_wkv(w, u, k, v, backend="torch")
    bi_wkv(w.double(), u.double(), k.double(), v.double())  # fp64 is the oracle's dtype: torch path
    bi_wkv(w * 50, u, k, v, chunk_size=1)  # (T - 1) |w| > 20: only the chunked form is exact
    bi_wkv(w, u, k.requires_grad_(), v)  # autograd: the kernel is forward only
    monkeypatch.setenv("LINMIX_FORCE_REFERENCE", "1")
    bi_wkv(w, u, k.detach(), v)
    assert calls == [1]
    assert wkv_module.native is native
    # The same decision, asked by callers that fuse the gate into the kernel.
    assert not wkv_module.native_bi_wkv_applies(w, u, k.detach(), v)
    monkeypatch.delenv("LINMIX_FORCE_REFERENCE")
    assert wkv_module.native_bi_wkv_applies(w, u, k.detach(), v)
    assert not wkv_module.native_bi_wkv_applies(w * 50, u, k.detach(), v)
    assert not wkv_module.native_bi_wkv_applies(w, u, k, v)  # k requires grad


@pytest.mark.parametrize("total, parts, align", [(384, 2, 16), (37, 3, 16), (5000, 2, 16), (10, 4, 1), (3, 8, 1), (1, 1, 16)])
def test_split_covers_the_range_in_aligned_pieces(total, parts, align):
    pieces = native._split(total, parts, align=align)
    assert pieces[0][0] == 0 and pieces[-1][1] == total
    assert all(a == prev_end for (_, prev_end), (a, _) in zip(pieces, pieces[1:]))
    assert all(a % align == 0 and b > a for a, b in pieces) and len(pieces) <= parts
    assert native._split(0, 2) == []
    wide = native._split(5000, max(2, -(-5000 // native._MAX_SLICE)), align=16)  # what bi_wkv_native asks for
    assert max(b - a for a, b in wide) <= native._MAX_SLICE


def test_bi_wkv_forced_native_errors_name_what_is_missing(monkeypatch):
    w, u, k, v = _inputs(10)
    with pytest.raises(ValueError, match="no autograd"):
        bi_wkv(w, u, k.requires_grad_(), v, backend="native")
    with pytest.raises(ValueError, match=r"\(T - 1\) max\|w\| <= 20"):
        bi_wkv(w * 10, u, k.detach(), v, backend="native")
    with pytest.raises(ValueError, match="backend must be one of"):
        bi_wkv(w, u, k.detach(), v, backend="c")
    monkeypatch.setattr(native, "_load", lambda: (None, "no C compiler found"))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        bi_wkv(w, u, k.detach(), v, backend="native")
    # backend="auto" falls back to torch quietly.
    assert_close_rms(bi_wkv(w, u, k.detach(), v), _reference(w, u, k.detach(), v), 2e-6, "fallback")


@pytest.mark.parametrize("height, width, channels, batch", [(8, 8, 16, 1), (3, 5, 10, 2), (1, 1, 4, 1), (1, 6, 8, 1), (6, 1, 8, 1), (5, 7, 7, 3), (2, 2, 3, 1)])
def test_q_shift_lerp_native_matches_shift_then_lerp(height, width, channels, batch):
    generator = torch.Generator().manual_seed(height * 100 + width)
    x = torch.randn(batch, height * width, channels, generator=generator)
    mixes = torch.rand(3, channels, generator=generator)
    mixes[0, :2] = torch.tensor([0.0, 1.0])[: min(2, channels)]  # lerp's end points
    out = native.q_shift_lerp_native(x, height, width, mixes)
    assert out.shape == (3, batch, height * width, channels) and all(o.is_contiguous() for o in out)
    shifted = q_shift(x, height, width)
    for mix, result in zip(mixes, out):
        torch.testing.assert_close(result, torch.lerp(shifted, x, mix), rtol=0, atol=1e-6)


def test_shifted_mixes_and_the_rwkv_block_match_their_torch_path(monkeypatch):
    torch.manual_seed(0)
    block = VRWKVBlock(64, layer_id=3, depth=8).eval()
    x = torch.randn(2, 12 * 10, 64)
    mixes = [torch.rand(64) for _ in range(2)]
    with torch.no_grad():
        fast_mixes = shifted_mixes(x, 12, 10, *mixes)
        fast = block(x, 12, 10)
        monkeypatch.setenv("LINMIX_FORCE_REFERENCE", "1")
        slow_mixes = shifted_mixes(x, 12, 10, *mixes)
        slow = block(x, 12, 10)
    for a, b in zip(fast_mixes, slow_mixes):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    # Training keeps the differentiable torch path.
    monkeypatch.delenv("LINMIX_FORCE_REFERENCE")
    x.requires_grad_()
    block(x, 12, 10).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_build_goes_to_the_cache_dir_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LINMIX_CACHE_DIR", str(tmp_path / "kernels"))
    native._load.cache_clear()
    try:
        assert native.available(), native.unavailable_reason()
        path = native.library_path()
        assert os.path.dirname(path) == str(tmp_path / "kernels")
        stamp = os.stat(path).st_mtime_ns
        native._load.cache_clear()
        assert native.available() and native.library_path() == path
        assert os.stat(path).st_mtime_ns == stamp  # loaded, not rebuilt
        assert not [p for p in os.listdir(tmp_path / "kernels") if p.endswith(".partial")]
    finally:
        native._load.cache_clear()


def test_missing_compiler_or_failed_build_means_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("LINMIX_CACHE_DIR", str(tmp_path))
    try:
        native._load.cache_clear()
        monkeypatch.setattr(native, "_compiler", lambda: None)
        assert not native.available()
        assert "no C compiler found" in native.unavailable_reason()
        assert not native.usable(torch.zeros(2))

        native._load.cache_clear()
        monkeypatch.undo()
        monkeypatch.setenv("LINMIX_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(native, "_FLAGS", native._FLAGS + ("-DLINMIX_BROKEN", "-include", "no/such/header.h"))
        assert not native.available()
        assert "failed" in native.unavailable_reason()
        # The torch paths still serve every caller.
        w, u, k, v = _inputs(20)
        with torch.no_grad():
            assert_close_rms(bi_wkv(w, u, k, v), _reference(w, u, k, v), 2e-6, "no kernels")
    finally:
        native._load.cache_clear()


def test_usable_names_what_disqualifies_an_input(monkeypatch):
    x = torch.zeros(2, 3)
    assert native.usable(x)
    assert native.ineligible(x.double()) == ["fp32 inputs"]
    assert native.ineligible(x.requires_grad_()) == ["no autograd (the kernel is forward only)"]
    with torch.no_grad():
        assert native.usable(x)
    monkeypatch.setenv("LINMIX_FORCE_REFERENCE", "1")
    assert not native.usable(x.detach())


def test_empty_inputs_give_empty_outputs():
    for shape in [(0, 5, 4), (2, 0, 4), (2, 5, 0)]:
        k = torch.zeros(shape)
        w = u = torch.zeros(shape[2])
        assert native.bi_wkv_native(w, u, k, k).shape == shape
        if shape[1] == 0:
            assert native.q_shift_lerp_native(k, 0, 1, torch.zeros(2, shape[2])).shape == (2, *shape)
    assert native.relu_square_(torch.zeros(0)).shape == (0,)
    assert native.sigmoid_mul_(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0, 3)


def test_bad_shapes_are_clear_errors_not_out_of_bounds_reads():
    x = torch.zeros(1, 12, 8)
    with pytest.raises(ValueError, match="T = height \\* width = 4 \\* 4"):
        native.q_shift_lerp_native(x, 4, 4, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="mixes must be"):
        native.q_shift_lerp_native(x, 3, 4, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="fp32 CPU"):
        native.q_shift_lerp_native(x.double(), 3, 4, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="one shape"):
        native.bi_wkv_native(torch.zeros(8), torch.zeros(8), x, torch.zeros(1, 11, 8))
    with pytest.raises(ValueError, match="one shape"):
        native.bi_wkv_native(torch.zeros(7), torch.zeros(8), x, x)
    with pytest.raises(ValueError, match="fp32 CPU"):
        native.bi_wkv_native(torch.zeros(8), torch.zeros(8), x.double(), x.double())
    with pytest.raises(ValueError, match="fp32 CPU"):
        native.relu_square_(torch.zeros(3, dtype=torch.float64))
