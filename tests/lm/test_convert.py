"""Conversion of official BASED checkpoints.

The tiny checkpoint below is built by hand from the official key list and shapes (never by saving a
linmix model), and the official forward is re-implemented here in plain torch on the official key
names, so a mapping mistake in linmix (Wqkv packing, conv layout, MLP half order, Taylor-map scale,
window / 2, head counts, rotary dims) shows up as a logit mismatch.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_close_rms
from safetensors.torch import save_file

from linmix.lm.convert import (
    convert_official,
    load_official_state_dict,
    official_config_to_linmix,
    save_as_linmix,
)
from linmix.lm.model import BasedForCausalLM

# Official-format config (field names and Hydra blocks as in the released based-360m config),
# shrunk. Layer 3 is listed by both alt_mixer_layers and alt_mixer_2_layers: sliding window wins.
OFFICIAL_CONFIG = {
    "_target_": "based.models.gpt.GPT2MixerConfig",
    "vocab_size": 203,  # padded to 208
    "n_embd": 64,
    "n_inner": 100,  # rounded up to 256
    "n_layer": 5,
    "n_head": 4,  # sliding-window heads (head_dim 16)
    "layer_norm_epsilon": 1e-5,
    "rotary_emb_base": 10000.0,
    "rotary_emb_fraction": 0.5,  # rotary on 8 of 16 dims
    "qkv_proj_bias": True,
    "out_proj_bias": False,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": True,
    "pad_vocab_size_multiple": 8,
    "alt_mixer_layers": [1, 3],
    "alt_mixer_2_layers": [3, 4],
    "mixer": {"_target_": "based.models.mixers.convolution.BaseConv", "l_max": 64, "use_bias": True,
              "expand_proj": 4, "kernel_sizes": 3},
    "alt_mixer": {"_target_": "based.models.mixers.linear_attention.LinearAttention", "l_max": 64,
                  "feature_map": {"_target_": "based.models.mixers.linear_attention.TaylorExp", "input_dim": 16},
                  "feature_dim": 8, "num_heads": 2, "parallel_implementation": "fla_parallel"},
    # num_heads here is overridden by n_head in the official code (sliding_window_additions).
    "alt_mixer_2": {"_target_": "based.models.mixers.slide_attention.SlidingAttention", "window_size": 6,
                    "num_heads": 2, "causal": True},
    # Fields the converter must tolerate.
    "rms_norm": True,
    "activation_function": "swiglu",
    "max_position_embeddings": 0,
    "n_positions": 2048,
    "special_initializer": True,
    "fused_mlp": False,
    "fused_bias_fc": True,
    "fused_dropout_add_ln": True,
    "use_flash_attn": True,
    "residual_in_fp32": True,
    "attn_pdrop": 0,
    "embd_pdrop": 0,
    "resid_pdrop": 0,
    "reorder_and_upcast_attn": False,
    "scale_attn_by_inverse_layer_idx": False,
    "fixed_decay": False,
    "decay_const": -3,
}
D, VOCAB, PADDED_VOCAB, HIDDEN, INNER, KERNEL = 64, 203, 208, 256, 128, 3
LINEAR_HEADS, FEATURE_DIM, INPUT_DIM = 2, 8, 16
WINDOW_HEADS, WINDOW_SIZE, ROTARY_DIM = 4, 6, 8
LAYER_KINDS = ["conv", "linear", "conv", "window", "window"]


def official_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors under the official key names and shapes (fp32)."""
    g = torch.Generator().manual_seed(seed)

    def weight(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm():
        return 1.0 + weight(D)

    sd = {"transformer.embeddings.word_embeddings.weight": weight(PADDED_VOCAB, D, std=0.5)}
    for i, kind in enumerate(LAYER_KINDS):
        p = f"transformer.layers.{i}."
        sd[p + "norm1.weight"] = norm()
        if kind == "conv":
            sd[p + "mixer.in_proj.weight"] = weight(2 * INNER, D)
            sd[p + "mixer.in_proj.bias"] = weight(2 * INNER)
            sd[p + "mixer.out_proj.weight"] = weight(D, INNER)
            sd[p + "mixer.out_proj.bias"] = weight(D)
            sd[p + "mixer.conv.conv.weight"] = weight(INNER, 1, KERNEL, std=0.5)
        elif kind == "linear":
            sd[p + "mixer.proj_q.weight"] = weight(LINEAR_HEADS * FEATURE_DIM, D, std=0.3)
            sd[p + "mixer.proj_k.weight"] = weight(LINEAR_HEADS * FEATURE_DIM, D, std=0.3)
            sd[p + "mixer.proj_v.weight"] = weight(D, D)
            sd[p + "mixer.out_proj.weight"] = weight(D, D)
        else:
            sd[p + "mixer.Wqkv.weight"] = weight(3 * D, D, std=0.3)
            sd[p + "mixer.Wqkv.bias"] = weight(3 * D)
            sd[p + "mixer.out_proj.weight"] = weight(D, D)
            sd[p + "mixer.rotary_emb.inv_freq"] = 1.0 / 10000.0 ** (torch.arange(0, ROTARY_DIM, 2) / ROTARY_DIM)
        sd[p + "norm2.weight"] = norm()
        sd[p + "mlp.fc1.weight"] = weight(2 * HIDDEN, D)
        sd[p + "mlp.fc2.weight"] = weight(D, HIDDEN)
        sd[p + "mlp.fc2.bias"] = weight(D)
    sd["transformer.ln_f.weight"] = norm()
    sd["lm_head.weight"] = sd["transformer.embeddings.word_embeddings.weight"]  # tied
    return sd


# ------------------------------------------------------------------ the official forward, in plain torch
def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def _linear(x, sd, name):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _base_conv(x, sd, p):
    u = _linear(x, sd, p + "in_proj")
    u1, u2 = u[..., :INNER], u[..., INNER:]
    w = sd[p + "conv.conv.weight"]  # [C, 1, K]; nn.Conv1d with left padding K-1, first T outputs
    padded = F.pad(u1, (0, 0, KERNEL - 1, 0))
    conv = sum(w[:, 0, k] * padded[:, k: k + x.shape[1]] for k in range(KERNEL))
    if p + "conv.conv.bias" in sd:  # official CUDA-kernel builds carry a conv bias
        conv = conv + sd[p + "conv.conv.bias"]
    return _linear(F.silu(conv) * u2, sd, p + "out_proj")


def _taylor(x):  # the official 1 + f + f^2 features, scaled by feature_map.input_dim
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2) / math.sqrt(INPUT_DIM)
    return torch.cat([torch.ones_like(x[..., :1]), x / INPUT_DIM ** 0.25, outer], dim=-1)


def _linear_attention(x, sd, p):
    b, t, _ = x.shape
    q = _linear(x, sd, p + "proj_q").view(b, t, LINEAR_HEADS, FEATURE_DIM).transpose(1, 2)
    k = _linear(x, sd, p + "proj_k").view(b, t, LINEAR_HEADS, FEATURE_DIM).transpose(1, 2)
    v = _linear(x, sd, p + "proj_v").view(b, t, LINEAR_HEADS, D // LINEAR_HEADS).transpose(1, 2)
    q, k = _taylor(q), _taylor(k)
    scores = torch.tril(q @ k.transpose(-1, -2))
    y = (scores @ v) / ((q * k.cumsum(2)).sum(-1, keepdim=True) + 1e-12)
    return _linear(y.transpose(1, 2).reshape(b, t, D), sd, p + "out_proj")


def _rotate(x):  # x [B, T, H, hd]: rotate-half on the first ROTARY_DIM dims, positions 0..T-1
    t = x.shape[1]
    # cos / sin in fp32 as flash-attn's RotaryEmbedding computes them (then cast to the input dtype).
    inverse = 1.0 / 10000.0 ** (torch.arange(0, ROTARY_DIM, 2, dtype=torch.float32) / ROTARY_DIM)
    angle = torch.arange(t, dtype=torch.float32)[:, None] * inverse  # [T, r/2]
    cos, sin = angle.cos().double()[None, :, None], angle.sin().double()[None, :, None]
    half = ROTARY_DIM // 2
    x1, x2, rest = x[..., :half], x[..., half:ROTARY_DIM], x[..., ROTARY_DIM:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _sliding_window(x, sd, p):
    b, t, _ = x.shape
    head_dim = D // WINDOW_HEADS
    q, k, v = _linear(x, sd, p + "Wqkv").view(b, t, 3, WINDOW_HEADS, head_dim).unbind(2)
    q, k = _rotate(q), _rotate(k)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * head_dim ** -0.5
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (i - j <= WINDOW_SIZE // 2)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = torch.einsum("bhij,bjhd->bihd", weights, v)
    return _linear(y.reshape(b, t, D), sd, p + "out_proj")


def official_forward(sd, input_ids):
    sd = {k: v.double() for k, v in sd.items()}
    x = sd["transformer.embeddings.word_embeddings.weight"][input_ids]
    for i, kind in enumerate(LAYER_KINDS):
        p = f"transformer.layers.{i}."
        h = _rms(x, sd[p + "norm1.weight"])
        mixer = {"conv": _base_conv, "linear": _linear_attention, "window": _sliding_window}[kind]
        x = x + mixer(h, sd, p + "mixer.")
        h = _rms(x, sd[p + "norm2.weight"])
        value, gate = _linear(h, sd, p + "mlp.fc1").chunk(2, dim=-1)
        x = x + _linear(value * F.silu(gate), sd, p + "mlp.fc2")
    h = _rms(x, sd["transformer.ln_f.weight"])
    return (h @ sd["transformer.embeddings.word_embeddings.weight"].T)[..., :VOCAB]


# ------------------------------------------------------------------ fixtures
def write_checkpoint(directory, sd, *, fmt: str, model_prefix: bool, with_lm_head: bool):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(OFFICIAL_CONFIG, indent=2))
    sd = dict(sd)
    if not with_lm_head:
        del sd["lm_head.weight"]
    if model_prefix:  # the 1b-50b files: Lightning prefix plus metric counters
        sd = {"model." + k: v for k, v in sd.items()}
        sd["train_metrics.num-tokens.count"] = torch.tensor(123.0)
        sd["model.transformer.decay.decay"] = torch.zeros(WINDOW_HEADS)
    if fmt == "bin":
        torch.save(sd, directory / "pytorch_model.bin")
    else:
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def state_dict():
    return official_state_dict()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ config semantics
def test_config_semantics():
    config = official_config_to_linmix(OFFICIAL_CONFIG)
    assert config.layer_types == ["base_conv", "linear_attention", "base_conv", "sliding_window", "sliding_window"]
    assert (config.d_model, config.n_layer, config.vocab_size, config.padded_vocab_size) == (64, 5, 203, 208)
    assert config.mlp_hidden == 256
    assert (config.mlp_fc1_bias, config.mlp_fc2_bias, config.qkv_bias, config.out_bias) == (False, True, True, False)
    assert (config.conv_expand, config.conv_kernel, config.conv_bias) == (2, 3, True)
    assert (config.linear_attention_heads, config.feature_dim, config.feature_map_input_dim) == (2, 8, 16)
    assert config.linear_attention_eps == 1e-12
    assert (config.num_heads, config.window, config.rotary_fraction, config.rotary_base) == (4, 3, 0.5, 10000.0)
    assert config.norm_eps == 1e-5 and config.tie_word_embeddings


def test_config_official_defaults():
    official = copy.deepcopy(OFFICIAL_CONFIG)
    for name in ("qkv_proj_bias", "out_proj_bias", "mlp_fc1_bias", "mlp_fc2_bias", "rotary_emb_fraction",
                 "rotary_emb_base", "n_inner", "pad_vocab_size_multiple", "layer_norm_epsilon"):
        del official[name]
    for name in ("use_bias", "expand_proj"):
        del official["mixer"][name]
    del official["alt_mixer_2"]["window_size"]
    config = official_config_to_linmix(official)
    assert (config.mlp_fc1_bias, config.mlp_fc2_bias, config.qkv_bias, config.out_bias, config.conv_bias) == (True,) * 5
    assert config.rotary_fraction == 0.0 and config.rotary_base == 10000.0
    assert config.mlp_hidden == 256  # int(8 * 64 / 3) = 170, rounded up to 256
    assert config.padded_vocab_size == 203 and config.norm_eps == 1e-5
    assert config.conv_expand == 1 and config.window == 64  # BaseConv expand_proj=2, window_size=128


def test_config_mixer_blocks_and_overrides():
    official = copy.deepcopy(OFFICIAL_CONFIG)
    official["mixer"] = None  # the attention baselines: MHA wherever no alternative mixer is listed
    official["alt_mixer"] = None
    official["alt_mixer_2_layers"] = [4]
    official["hidden_size"] = 64  # GPT2Config alias of n_embd
    assert official_config_to_linmix(official).layer_types == ["attention"] * 4 + ["sliding_window"]
    official = copy.deepcopy(OFFICIAL_CONFIG)
    official["mixer"].update(kernel_size=4, use_bias=False, expand_proj=6)
    config = official_config_to_linmix(official)
    assert (config.conv_kernel, config.conv_bias, config.conv_expand) == (4, False, 3)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("rms_norm"), "rms_norm"),
    (lambda c: c.update(activation_function="gelu_new"), "activation_function"),
    (lambda c: c.pop("max_position_embeddings"), "position"),
    (lambda c: c["mixer"].update(expand_proj=3), "expand_proj"),
    (lambda c: c.update(n_head_kv=2), "n_head_kv"),
    (lambda c: c.update(rotary_emb_interleaved=True), "interleaved"),
    (lambda c: c["alt_mixer"].update(head_dim=16), "head_dim"),
    (lambda c: c["alt_mixer_2"].update(_target_="based.models.mixers.slide_fa2.SlidingsMHA"), "alt_mixer_2._target_"),
])
def test_config_unsupported_options_raise(change, message):
    official = copy.deepcopy(OFFICIAL_CONFIG)
    change(official)
    with pytest.raises(ValueError, match=message):
        official_config_to_linmix(official)


# ------------------------------------------------------------------ conversion
def test_layers_match_plain_torch_official_forward_fp64(tmp_path, state_dict):
    """Each converted mixer, MLP and norm against the official computation, fp64-tight."""
    directory = write_checkpoint(tmp_path / "ckpt", state_dict, fmt="bin", model_prefix=False, with_lm_head=True)
    model = convert_official(directory, dtype=torch.float64)
    sd = {k: v.double() for k, v in state_dict.items()}
    x = torch.randn(2, 16, D, dtype=torch.float64)
    for i, kind in enumerate(LAYER_KINDS):
        block, p = model.transformer.layers[i], f"transformer.layers.{i}."
        mixer = {"conv": _base_conv, "linear": _linear_attention, "window": _sliding_window}[kind]
        assert_close_rms(block.mixer(x), mixer(x, sd, p + "mixer."), 1e-12, f"layer {i} {kind} mixer")
        value, gate = _linear(x, sd, p + "mlp.fc1").chunk(2, dim=-1)
        assert_close_rms(block.mlp(x), _linear(value * F.silu(gate), sd, p + "mlp.fc2"), 1e-12, f"layer {i} MLP")
        assert_close_rms(block.norm1(x), _rms(x, sd[p + "norm1.weight"]), 1e-12, f"layer {i} norm1")
        assert_close_rms(block.norm2(x), _rms(x, sd[p + "norm2.weight"]), 1e-12, f"layer {i} norm2")


def test_logits_match_plain_torch_official_forward(tmp_path, state_dict, input_ids):
    """The whole fp32 model (residual in fp32, as the official residual_in_fp32) against the
    official forward computed in fp64."""
    directory = write_checkpoint(tmp_path / "ckpt", state_dict, fmt="bin", model_prefix=False, with_lm_head=True)
    model = convert_official(directory)
    assert model.dtype == torch.float32  # None keeps the checkpoint's dtype
    logits = model(input_ids).logits
    assert_close_rms(logits, official_forward(state_dict, input_ids), TOLERANCE[torch.float32], "fp32 logits")


@pytest.mark.parametrize("fmt, model_prefix, with_lm_head", [
    ("bin", False, True), ("bin", True, False), ("safetensors", False, False), ("safetensors", True, True)])
def test_file_formats_prefixes_and_round_trip(tmp_path, state_dict, input_ids, fmt, model_prefix, with_lm_head):
    directory = write_checkpoint(tmp_path / "ckpt", state_dict, fmt=fmt, model_prefix=model_prefix, with_lm_head=with_lm_head)
    model = convert_official(directory)
    # every linmix tensor came from the checkpoint
    for name, value in model.state_dict().items():
        source = state_dict["transformer.embeddings.word_embeddings.weight" if name == "lm_head.weight" else name]
        assert torch.equal(value, source), name
    logits = model(input_ids).logits
    assert logits.shape == (2, 16, VOCAB)
    assert_close_rms(logits, official_forward(state_dict, input_ids), TOLERANCE[torch.float32], f"{fmt} logits")

    out = save_as_linmix(directory, tmp_path / "linmix")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = BasedForCausalLM.from_pretrained(out)
    assert reloaded.config == model.config
    assert torch.equal(reloaded(input_ids).logits, logits)


def test_explicit_paths(tmp_path, state_dict):
    directory = write_checkpoint(tmp_path / "ckpt", state_dict, fmt="safetensors", model_prefix=False, with_lm_head=True)
    weights = directory / "model.safetensors"
    a = convert_official((directory / "config.json", weights))
    b = convert_official({"config": directory / "config.json", "weights": weights})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _fresh_model():
    return BasedForCausalLM(official_config_to_linmix(OFFICIAL_CONFIG))


def test_missing_key_raises(state_dict):
    sd = dict(state_dict)
    del sd["transformer.layers.0.mlp.fc2.weight"]
    with pytest.raises(ValueError, match=r"missing keys.*transformer\.layers\.0\.mlp\.fc2\.weight"):
        load_official_state_dict(_fresh_model(), sd)


def test_wrong_shape_raises(state_dict):
    sd = dict(state_dict)
    sd["transformer.layers.1.mixer.proj_q.weight"] = torch.zeros(24, D)
    with pytest.raises(ValueError, match=r"transformer\.layers\.1\.mixer\.proj_q\.weight: checkpoint shape \[24, 64\] "
                                         r"vs linmix shape \[16, 64\]"):
        load_official_state_dict(_fresh_model(), sd)


def test_unexpected_key_raises(state_dict):
    sd = dict(state_dict)
    sd["transformer.layers.0.mixer.conv.conv.bias"] = torch.zeros(INNER)
    with pytest.raises(ValueError, match=r"unexpected keys.*transformer\.layers\.0\.mixer\.conv\.conv\.bias"):
        load_official_state_dict(_fresh_model(), sd)


def test_short_conv_bias_is_loaded_when_the_file_has_it(tmp_path, state_dict, input_ids):
    sd = dict(state_dict)
    for i in range(len(LAYER_KINDS)):
        if f"transformer.layers.{i}.mixer.in_proj.weight" in sd:
            sd[f"transformer.layers.{i}.mixer.conv.conv.bias"] = torch.randn(INNER) * 0.1
    model = convert_official(write_checkpoint(tmp_path / "ckpt", sd, fmt="safetensors", model_prefix=False, with_lm_head=True))
    assert model.config.short_conv_bias
    assert_close_rms(model(input_ids).logits, official_forward(sd, input_ids), TOLERANCE[torch.float32], "logits with conv bias")


def test_untied_lm_head_raises(state_dict):
    sd = dict(state_dict)
    sd["lm_head.weight"] = state_dict["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_official_state_dict(_fresh_model(), sd)


class _NotATensor:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    torch.save({"transformer.ln_f.weight": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights-only"):
        convert_official(tmp_path)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_official(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    with pytest.raises(FileNotFoundError, match="no weights"):
        convert_official(tmp_path)
