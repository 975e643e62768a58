"""SS2D and VisionMambaBlock against a slow reference written here: four separate sequential scans
over explicitly permuted sequences (VMamba's cross-scan / cross-merge spelled out)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import TOLERANCE, assert_close_rms
from linmix.layers import SS2D, VisionMambaBlock
from linmix.layers.vision_mamba import VISION_MAMBA_MIXERS, ss2d_parameter_count
from linmix.ops import native
from linmix.ops.selective_scan import BIDIRECTIONAL_DIRECTIONS, selective_scan_reference


def scan_order(direction: str, height: int, width: int) -> list[int]:
    """Grid tokens (row-major index h * width + w) in the order a direction visits them."""
    if direction.startswith("row"):
        order = list(range(height * width))
    else:
        order = [h * width + w for w in range(width) for h in range(height)]
    return order[::-1] if direction.endswith("reversed") else order


def slow_ss2d(layer: SS2D, x: torch.Tensor, height: int, width: int, params=None) -> torch.Tensor:
    """SS2D in fp64, one direction at a time: permute u, project it with that direction's x_proj and
    dt_proj, run the plain sequential scan, scatter the output back to the grid, sum (or average).
    ``params``: the fp64 parameters by name (default: the layer's, detached)."""
    p = params if params is not None else {name: value.detach().double() for name, value in layer.named_parameters()}
    batch, length, _ = x.shape
    x = x.double()
    projected = x @ p["in_proj.weight"].T
    x1, z = projected.chunk(2, dim=-1) if layer.gate else (projected, None)
    grid = x1.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
    u = F.silu(F.conv2d(grid, p["conv2d.weight"], p.get("conv2d.bias"), padding=layer.conv2d.padding,
                        groups=layer.inner_dim)).permute(0, 2, 3, 1).reshape(batch, length, -1)
    inner, rank, state = layer.inner_dim, layer.dt_rank, layer.d_state
    merged = torch.zeros_like(u)
    for k, direction in enumerate(layer.directions):
        index = torch.tensor(scan_order(direction, height, width))
        sequence = u[:, index]
        dbc = sequence @ p["x_proj_weight"][k].T
        dt_low, B, C = dbc[..., :rank], dbc[..., rank:rank + state], dbc[..., rank + state:]
        delta = dt_low @ p["dt_projs_weight"][k].T
        A = -torch.exp(p["A_logs"][k * inner:(k + 1) * inner])
        y = selective_scan_reference(sequence, delta, A, B, C, D=p["Ds"][k * inner:(k + 1) * inner],
                                     delta_bias=p["dt_projs_bias"][k * inner:(k + 1) * inner], delta_softplus=True)
        merged = merged.index_add(1, index, y)
    if layer.merge == "mean":
        merged = merged / len(layer.directions)
    if isinstance(layer.out_norm, torch.nn.LayerNorm):
        merged = F.layer_norm(merged, (inner,), p["out_norm.weight"], p["out_norm.bias"], layer.out_norm.eps)
    if z is not None:
        merged = merged * F.silu(z)
    return merged @ p["out_proj.weight"].T


def randomised(layer: SS2D) -> SS2D:
    """Non-trivial A, D and norm so that every parameter matters in the comparison."""
    with torch.no_grad():
        layer.A_logs.uniform_(-1.0, 1.5)
        layer.Ds.normal_()
        if isinstance(layer.out_norm, torch.nn.LayerNorm):
            layer.out_norm.weight.normal_(1.0, 0.3)
            layer.out_norm.bias.normal_(0.0, 0.3)
    return layer


CONFIGS = {
    "vmamba_v2": {},
    "vmamba_v0": {"d_state": 4, "gate": True, "conv_bias": True},
    "vim_bi": VISION_MAMBA_MIXERS["mamba_bi"] | {"d_state": 3},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("height, width", [(5, 7), (4, 4), (1, 6)])
def test_ss2d_equals_four_separate_scans(config, height, width):
    torch.manual_seed(0)
    layer = randomised(SS2D(16, **CONFIGS[config])).eval()
    x = torch.randn(2, height * width, 16)
    expected = slow_ss2d(layer, x, height, width)
    for backend in ("torch", "auto"):  # auto: the native C kernel where it builds
        with torch.no_grad():
            layer.backend = backend
            assert_close_rms(layer(x, height, width), expected, TOLERANCE[torch.float32], f"{config} {backend}")


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_native_path_is_taken_in_inference(monkeypatch):
    calls = []
    original = native.cross_selective_scan_native
    monkeypatch.setattr(native, "cross_selective_scan_native", lambda *a, **k: calls.append(1) or original(*a, **k))
    layer = SS2D(8).eval()
    with torch.no_grad():
        layer(torch.randn(1, 12, 8), 3, 4)
    assert calls == [1]


def test_gradients_flow_and_match_the_slow_reference():
    torch.manual_seed(1)
    layer = randomised(SS2D(8, d_state=2))
    x = torch.randn(1, 12, 8, requires_grad=True)
    weights = torch.randn(1, 12, 8)
    (layer(x, 3, 4) * weights).sum().backward()
    actual = {name: p.grad.clone() for name, p in layer.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in actual.values())
    layer64 = randomised(SS2D(8, d_state=2)).double()
    layer64.load_state_dict(layer.state_dict())
    x64 = x.detach().double().requires_grad_(True)
    (slow_ss2d(layer64, x64, 3, 4, dict(layer64.named_parameters())) * weights.double()).sum().backward()
    for name, p in layer64.named_parameters():
        assert_close_rms(actual[name], p.grad, TOLERANCE[torch.float32], f"grad {name}")
    assert_close_rms(x.grad, x64.grad, TOLERANCE[torch.float32], "grad x")


@pytest.mark.parametrize("dim", [192, 384, 768, 1024])
def test_parameter_count_matches_the_formula(dim):
    layer = SS2D(dim)
    count = sum(p.numel() for p in layer.parameters())
    assert count == ss2d_parameter_count(dim)
    inner, rank = 2 * dim, math.ceil(dim / 16)
    assert count == inner * (2 * dim + 9 + 4 * (2 * rank + 3 + 2) + 2)  # spec 5.4: 761,088 at C = 384
    if dim == 384:
        assert count == 761_088
    gated = SS2D(dim, d_state=16, gate=True, conv_bias=True)
    assert sum(p.numel() for p in gated.parameters()) == ss2d_parameter_count(dim, d_state=16, gate=True, conv_bias=True)


def test_block_is_within_ten_percent_of_the_rwkv_block():
    from linmix.sam.backbone import VRWKVBlock

    for dim in (192, 384):  # the backbone test checks every size
        rwkv = sum(p.numel() for p in VRWKVBlock(dim, 0, 14).parameters())
        assert rwkv == 9 * dim * dim + 13 * dim
        for name, settings in VISION_MAMBA_MIXERS.items():
            mamba = sum(p.numel() for p in VisionMambaBlock(dim, **settings).parameters())
            assert abs(mamba / rwkv - 1) <= 0.10, (name, dim, mamba, rwkv)


def test_initialisation_follows_vmamba():
    torch.manual_seed(0)
    layer = SS2D(32, d_state=4)
    assert torch.equal(layer.A_logs, torch.log(torch.arange(1.0, 5.0)).expand(4 * 64, 4))
    assert torch.equal(layer.Ds, torch.ones(4 * 64))
    dt = F.softplus(layer.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert layer.dt_projs_weight.abs().max() <= layer.dt_rank ** -0.5
    assert layer.in_proj.weight.shape == (64, 32) and layer.conv2d.bias is None  # v2: no gate, no conv bias


def test_block_forward_backward_and_drop_path():
    torch.manual_seed(0)
    block = VisionMambaBlock(16, drop_path=0.5)
    x = torch.randn(4, 20, 16, requires_grad=True)
    with torch.no_grad():
        block.gamma1.fill_(1.0)
        block.gamma2.fill_(1.0)
    block.eval()
    expected = x + block.mixer(block.ln1(x), 4, 5)
    expected = expected + block.mlp(block.ln2(expected))
    assert_close_rms(block(x, 4, 5), expected, 1e-6, "eval block")
    block.train()
    block(x, 4, 5).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"directions": ("row", "diagonal")}, "directions must be"),
    ({"merge": "max"}, "merge must be"),
    ({"d_conv": 4}, "d_conv must be odd"),
    ({"ssm_ratio": 0}, "ssm_ratio must be positive"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SS2D(8, **kwargs)


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match=r"T = height \* width = 3 \* 3"):
        SS2D(8)(torch.randn(1, 10, 8), 3, 3)


def test_bidirectional_mixer_settings():
    layer = SS2D(8, **VISION_MAMBA_MIXERS["mamba_bi"])
    assert layer.directions == BIDIRECTIONAL_DIRECTIONS and layer.gate and layer.merge == "mean"
    assert layer.x_proj_weight.shape[0] == 2
