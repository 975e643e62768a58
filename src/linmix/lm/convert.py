"""Load the official BASED checkpoints (HazyResearch/based) into :class:`BasedForCausalLM`.

An official checkpoint is a ``config.json`` in the official format (a ``transformers.GPT2Config``
plus BASED's ``mixer`` / ``alt_mixer`` / ``alt_mixer_2`` blocks, each a Hydra target with keyword
arguments) and weights in ``pytorch_model.bin`` (pickled; read with ``weights_only=True``) or
``model.safetensors`` (sharded files with an ``*.index.json`` also work).

- :func:`official_config_to_linmix`: official config dict -> :class:`BasedConfig`, reading every
  field the way the official code does (defaults included; see the table in its docstring).
- :func:`load_official_state_dict`: copy an official state dict into a model; every official key
  must be consumed and every linmix parameter filled, else a ValueError names the keys.
- :func:`convert_official`: directory (or explicit paths) -> model.
- :func:`save_as_linmix`: official directory -> linmix directory (config.json + model.safetensors).

Official key layout (after the optional ``model.`` prefix of the 1b-50b files is stripped)::

    transformer.embeddings.word_embeddings.weight   [V_padded, d]
    transformer.layers.{i}.norm1.weight / norm2.weight   [d]
    transformer.layers.{i}.mlp.fc1.weight [2 * hidden, d] (rows: value then gate), fc2.weight [d, hidden]
    BaseConv:       mixer.in_proj.{weight,bias} [2 * inner, d], mixer.out_proj.{weight,bias} [d, inner],
                    mixer.conv.conv.weight [inner, 1, K]   (``conv1`` in the base_conv.py variants)
    linear attn:    mixer.proj_q / proj_k.weight [h * f, d], mixer.proj_v / out_proj.weight [d, d]
    sliding window / attention: mixer.Wqkv.weight [3d, d] ([Q | K | V]), mixer.out_proj.weight [d, d]
    transformer.ln_f.weight [d]; lm_head.weight [V_padded, d] (tied to the embedding; may be absent)

These are exactly linmix's parameter names. Ignored: rotary ``inv_freq`` buffers, the ``decay``
buffer of the fixed-decay option, and anything with ``metrics`` in its name (Lightning counters).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from linmix.lm.config import BasedConfig
from linmix.lm.model import BasedForCausalLM

__all__ = [
    "OFFICIAL_CONFIG_NAME",
    "convert_official",
    "load_official_files",
    "load_official_state_dict",
    "normalize_official_keys",
    "official_config_to_linmix",
    "save_as_linmix",
]

OFFICIAL_CONFIG_NAME = "config.json"
# Weight files searched for in a directory, in order of preference (safetensors needs no unpickling).
OFFICIAL_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# The official mixer classes this converter understands (Hydra ``_target_`` strings). A block
# without ``_target_`` is read as the released class.
BASE_CONV_TARGETS = {
    "based.models.mixers.convolution.BaseConv": "conv",  # the released models
    "based.models.mixers.base_conv.BaseConv": "conv1",
    "based.models.mixers.base_conv.BaseConvWithSiLU4": "conv1",
}
LINEAR_ATTENTION_TARGETS = ("based.models.mixers.linear_attention.LinearAttention",)
TAYLOR_FEATURE_MAP_TARGETS = ("based.models.mixers.linear_attention.TaylorExp",)
SLIDING_WINDOW_TARGETS = ("based.models.mixers.slide_attention.SlidingAttention",)

# GPT2Config defaults the official model inherits when a field is absent.
_GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                  "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "activation_function": "gelu_new"}
# GPT2Config.attribute_map: the other spelling of a field.
_GPT2_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                 "n_positions": "max_position_embeddings"}


# ---------------------------------------------------------------------------------------- config
def _gpt2_field(official: Mapping[str, Any], name: str) -> Any:
    """A GPT2Config field: its own spelling or its alias (the alias wins, as in GPT2Config, where
    keyword arguments beyond the signature are set last), else the GPT2Config default."""
    alias = _GPT2_ALIASES.get(name)
    if alias is not None and alias in official:
        return official[alias]
    return official.get(name, _GPT2_DEFAULTS.get(name))


def _block(official: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = official.get(name)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"official config field {name!r} must be an object (a Hydra block) or null, got {value!r}")
    return dict(value)


def _check_target(block: Mapping[str, Any], name: str, supported: Sequence[str]) -> str:
    target = block.get("_target_", supported[0])
    if target not in supported:
        raise ValueError(f"official {name}._target_ {target!r} is not supported; expected one of {list(supported)}")
    return target


def _layer_list(official: Mapping[str, Any], name: str) -> list[int]:
    value = official.get(name)
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"official config field {name!r} must be a list of layer indices, got {value!r}")
    return list(value)


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"official config field {name} must be a positive integer, got {value!r}")
    return value


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def official_config_to_linmix(official: Mapping[str, Any]) -> BasedConfig:
    """The :class:`BasedConfig` of the model the official code builds from this config dict.

    Absent fields take the official defaults (the GPT2Config default or the mixer class's keyword
    default). Options the official code supports but linmix does not raise ValueError.

    ==============================================  ===============================================
    official field(s)                               linmix
    ==============================================  ===============================================
    layer i in alt_mixer_2_layers (checked first)   ``"sliding_window"`` (``"attention"`` if
                                                    alt_mixer_2 is null)
    else layer i in alt_mixer_layers                ``"linear_attention"`` (``"attention"`` if
                                                    alt_mixer is null)
    else                                            ``"base_conv"`` (``"attention"`` if mixer is null)
    vocab_size, pad_vocab_size_multiple (1)         same (padded rows of the embedding kept)
    n_embd / n_layer                                d_model / n_layer
    n_inner (None: int(8 * n_embd / 3))             mlp_hidden = that rounded up to a multiple of 256
    mlp_fc1_bias, mlp_fc2_bias (True)               same
    layer_norm_epsilon (1e-5)                       norm_eps
    mixer.expand_proj (2), use_bias (True)          conv_expand = expand_proj / 2, conv_bias
    mixer.kernel_size (3; kernel_sizes[0] for
      BaseConvWithSiLU4)                            conv_kernel
    alt_mixer.num_heads (16), feature_dim (16)      linear_attention_heads, feature_dim
    alt_mixer.feature_map.input_dim                 feature_map_input_dim (Taylor-map scale)
    alt_mixer.eps (1e-12)                           linear_attention_eps
    n_head (12; alt_mixer_2.num_heads is unused)    num_heads (sliding window and attention)
    alt_mixer_2.window_size (128)                   window = window_size // 2
    rotary_emb_fraction (0.0), rotary_emb_base      rotary_fraction (0 disables), rotary_base
    qkv_proj_bias, out_proj_bias (True)             qkv_bias, out_bias
    tie_word_embeddings (True)                      same
    ==============================================  ===============================================

    Required as the BASED models have them: ``rms_norm: true``, ``activation_function: "swiglu"``,
    no absolute position embeddings (``max_position_embeddings`` / ``n_positions`` 0), pre-norm,
    sequential blocks, softmax scale ``head_dim ** -0.5``, no grouped KV heads, non-interleaved rotary.
    """
    if not isinstance(official, Mapping):
        raise ValueError(f"the official config must be a JSON object, got {type(official).__name__}")

    # ---- the model skeleton the official GPTLMHeadModel builds
    _require(official.get("rms_norm", False) is True,
             "official config must set rms_norm: true (without it the official model uses LayerNorm with a bias, "
             "which linmix's BASED stack does not have)")
    activation = _gpt2_field(official, "activation_function")
    _require(activation == "swiglu",
             f"official activation_function must be 'swiglu' (linmix's gated SiLU MLP), got {activation!r}")
    _require(official.get("mlp_type", "base") == "base",
             f"official mlp_type must be 'base', got {official.get('mlp_type')!r}")
    _require(not official.get("fused_dense_sqrelu_dense", False), "official fused_dense_sqrelu_dense is not supported")
    positions = _gpt2_field(official, "n_positions")
    _require(positions in (0, None),
             f"official max_position_embeddings / n_positions = {positions!r} means absolute position embeddings, "
             "which BASED does not use and linmix does not support; expected 0")
    _require(official.get("prenorm", True) is True, "official prenorm: false (post-norm blocks) is not supported")
    _require(not official.get("parallel_block", False), "official parallel_block: true is not supported")
    _require(official.get("word_embed_proj_dim") is None, "official word_embed_proj_dim is not supported")
    _require(not official.get("lm_head_bias", False), "official lm_head_bias: true is not supported")

    d_model = _positive_int("n_embd", _gpt2_field(official, "n_embd"))
    n_layer = _positive_int("n_layer", _gpt2_field(official, "n_layer"))
    n_head = _positive_int("n_head", _gpt2_field(official, "n_head"))
    vocab_size = _positive_int("vocab_size", _gpt2_field(official, "vocab_size"))
    pad_multiple = _positive_int("pad_vocab_size_multiple", official.get("pad_vocab_size_multiple", 1))

    # ---- which mixer each layer gets (create_mixer_cls: alt_mixer_2 is checked before alt_mixer)
    mixer, alt_mixer, alt_mixer_2 = (_block(official, name) for name in ("mixer", "alt_mixer", "alt_mixer_2"))
    linear_layers = set(_layer_list(official, "alt_mixer_layers"))
    window_layers = set(_layer_list(official, "alt_mixer_2_layers"))
    layer_types = []
    for i in range(n_layer):
        if i in window_layers:
            layer_types.append("sliding_window" if alt_mixer_2 is not None else "attention")
        elif i in linear_layers:
            layer_types.append("linear_attention" if alt_mixer is not None else "attention")
        else:
            layer_types.append("base_conv" if mixer is not None else "attention")
    used = set(layer_types)

    # ---- MLP: GatedMlp(hidden_features=n_inner) rounds up to a multiple of 256; with n_inner
    # unset it starts from int(8 * d / 3) (flash-attn's GatedMlp default).
    n_inner = official.get("n_inner")
    hidden = int(8 * d_model / 3) if n_inner is None else _positive_int("n_inner", n_inner)
    mlp_hidden = -(-hidden // 256) * 256

    values: dict[str, Any] = dict(
        vocab_size=vocab_size,
        pad_vocab_size_multiple=pad_multiple,
        d_model=d_model,
        n_layer=n_layer,
        layer_types=layer_types,
        mlp_hidden=mlp_hidden,
        mlp_fc1_bias=bool(official.get("mlp_fc1_bias", True)),
        mlp_fc2_bias=bool(official.get("mlp_fc2_bias", True)),
        norm_eps=float(_gpt2_field(official, "layer_norm_epsilon")),
        initializer_range=float(_gpt2_field(official, "initializer_range")),
        tie_word_embeddings=bool(official.get("tie_word_embeddings", True)),
    )

    # ---- BaseConv (in_proj: d -> expand_proj * d, inner = expand_proj * d / 2)
    if mixer is not None:
        target = _check_target(mixer, "mixer", list(BASE_CONV_TARGETS))
        expand_proj = _positive_int("mixer.expand_proj", mixer.get("expand_proj", 2))
        _require(expand_proj % 2 == 0,
                 f"official mixer.expand_proj must be even (inner width expand_proj * d / 2 = linmix conv_expand * d), got {expand_proj}")
        if target.endswith("WithSiLU4"):
            kernel_sizes = mixer.get("kernel_sizes", [3])
            kernel = kernel_sizes[0] if isinstance(kernel_sizes, Sequence) and kernel_sizes else kernel_sizes
        else:  # convolution.BaseConv takes kernel_size; its kernel_sizes is swallowed by **kwargs
            kernel = mixer.get("kernel_size", 3)
        values.update(conv_expand=expand_proj // 2, conv_kernel=_positive_int("mixer kernel size", kernel),
                      conv_bias=bool(mixer.get("use_bias", True)))

    # ---- Taylor linear attention
    if alt_mixer is not None and "linear_attention" in used:
        _check_target(alt_mixer, "alt_mixer", LINEAR_ATTENTION_TARGETS)
        heads = _positive_int("alt_mixer.num_heads", alt_mixer.get("num_heads", 16))
        feature_dim = _positive_int("alt_mixer.feature_dim", alt_mixer.get("feature_dim", 16))
        _require(d_model % heads == 0, f"n_embd ({d_model}) must be divisible by alt_mixer.num_heads ({heads})")
        head_dim = alt_mixer.get("head_dim")
        _require(head_dim is None or head_dim == d_model // heads,
                 f"official alt_mixer.head_dim = {head_dim} differs from n_embd / num_heads = {d_model // heads}; "
                 "linmix's linear attention has head_dim = d_model / num_heads")
        input_dim = None
        feature_map = alt_mixer.get("feature_map")
        if feature_map is not None:
            _require(isinstance(feature_map, Mapping), f"official alt_mixer.feature_map must be an object, got {feature_map!r}")
            _check_target(feature_map, "alt_mixer.feature_map", TAYLOR_FEATURE_MAP_TARGETS)
            if feature_map.get("input_dim") is not None:
                input_dim = _positive_int("alt_mixer.feature_map.input_dim", feature_map["input_dim"])
        values.update(linear_attention_heads=heads, feature_dim=feature_dim, feature_map_input_dim=input_dim,
                      linear_attention_eps=float(alt_mixer.get("eps", 1e-12)))

    # ---- softmax attention (sliding window via sliding_window_additions, or flash-attn MHA)
    values["num_heads"] = n_head
    if used & {"sliding_window", "attention"}:
        _require(d_model % n_head == 0, f"n_embd ({d_model}) must be divisible by n_head ({n_head})")
        head_dim = d_model // n_head
        _require(official.get("head_dim") in (None, head_dim),
                 f"official head_dim = {official.get('head_dim')} differs from n_embd / n_head = {head_dim}")
        kv_heads = official.get("n_head_kv")
        _require(kv_heads in (None, n_head), f"official n_head_kv = {kv_heads} (grouped KV heads) is not supported")
        _require(official.get("scale_attn_weights", True) is True,
                 "official scale_attn_weights: false (softmax scale 1) is not supported")
        _require(not official.get("scale_attn_by_inverse_layer_idx", False),
                 "official scale_attn_by_inverse_layer_idx: true is not supported")
        _require(not official.get("rotary_emb_interleaved", False), "official rotary_emb_interleaved: true is not supported")
        _require(official.get("rotary_emb_scale_base") is None, "official rotary_emb_scale_base (xPos) is not supported")
        _require(not official.get("attn_dwconv", False), "official attn_dwconv: true is not supported")
        fraction = float(official.get("rotary_emb_fraction", 0.0))
        _require(0.0 <= fraction <= 1.0, f"official rotary_emb_fraction must lie in [0, 1], got {fraction}")
        values.update(rotary_fraction=fraction, rotary_base=float(official.get("rotary_emb_base", 10000.0)),
                      qkv_bias=bool(official.get("qkv_proj_bias", True)),
                      out_bias=bool(official.get("out_proj_bias", True)))
    if alt_mixer_2 is not None and "sliding_window" in used:
        _check_target(alt_mixer_2, "alt_mixer_2", SLIDING_WINDOW_TARGETS)
        window_size = alt_mixer_2.get("window_size", 128)
        _require(window_size is not None, "official alt_mixer_2.window_size: null (global attention) is not supported")
        window_size = _positive_int("alt_mixer_2.window_size", window_size)
        _require(window_size >= 2, f"official alt_mixer_2.window_size must be >= 2, got {window_size}")
        # flash-attn window (window_size // 2, 0): each query sees itself and window_size // 2 keys back
        values["window"] = window_size // 2
    return BasedConfig(**values)


# ---------------------------------------------------------------------------------------- keys
def _is_ignored(key: str) -> bool:
    parts = key.split(".")
    return "metrics" in key or parts[-1] == "inv_freq" or "decay" in parts


def normalize_official_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> linmix keys: drop ignorable buffers, strip a leading ``model.``, rename
    ``mixer.conv1.`` to ``mixer.conv.`` (the base_conv.py BaseConv variants)."""
    normalized: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"state dict keys must be strings, got {key!r}")
        if _is_ignored(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"official state dict entry {key!r} is a {type(value).__name__}, expected a tensor")
        new = key[len("model."):] if key.startswith("model.") else key
        if ".mixer.conv1." in new:
            new = new.replace(".mixer.conv1.", ".mixer.conv.", 1)
        if new in normalized:
            raise ValueError(f"official keys {origin[new]!r} and {key!r} both map to {new!r}")
        normalized[new] = value
        origin[new] = key
    return normalized


def load_official_state_dict(model: BasedForCausalLM, state_dict: Mapping[str, torch.Tensor]) -> BasedForCausalLM:
    """Copy an official state dict into ``model`` (in place; returns it).

    Every remaining official key must be consumed and every parameter of ``model`` filled; a
    missing key, a mis-shaped tensor or an unexpected key raises ValueError naming the key (and
    both shapes). With tied embeddings ``lm_head.weight`` may be absent; if present it must equal
    the embedding. Values are cast to each parameter's dtype.
    """
    official = normalize_official_keys(state_dict)
    targets = model.state_dict(keep_vars=True)
    tied = model.config.tie_word_embeddings
    embedding_key = "transformer.embeddings.word_embeddings.weight"

    missing, mismatched = [], []
    for name, target in targets.items():
        if tied and name == "lm_head.weight":
            continue
        if name not in official:
            missing.append(f"{name} (linmix shape {list(target.shape)})")
        elif tuple(official[name].shape) != tuple(target.shape):
            mismatched.append(f"{name}: checkpoint shape {list(official[name].shape)} vs linmix shape {list(target.shape)}")
    consumed = set(targets)
    unexpected = sorted(set(official) - consumed)
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if unexpected:
        problems.append(f"unexpected keys: {[f'{k} {list(official[k].shape)}' for k in unexpected]}")
    if problems:
        raise ValueError("official checkpoint does not match the model built from its config; " + "; ".join(problems))
    if tied and "lm_head.weight" in official:
        if not torch.equal(official["lm_head.weight"], official[embedding_key].to(official["lm_head.weight"].dtype)):
            raise ValueError("the config ties lm_head.weight to the word embedding (tie_word_embeddings), "
                             "but the checkpoint's lm_head.weight differs from its embedding")

    with torch.no_grad():
        for name, target in targets.items():
            if tied and name == "lm_head.weight":
                continue
            source = official[name]
            if not (source.is_floating_point() or source.is_complex()) and target.is_floating_point():
                raise ValueError(f"official {name} has dtype {source.dtype}, expected a floating-point tensor")
            target.copy_(source.to(device=target.device, dtype=target.dtype))
    return model


# ---------------------------------------------------------------------------------------- files
def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a sharded-checkpoint index (a JSON object with 'weight_map'): {error}") from error
        merged: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            merged.update(_load_weight_file(path.parent / shard))
        return merged
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # an unpickling error: not a plain tensor checkpoint
        raise ValueError(f"{path} could not be read as a weights-only PyTorch checkpoint "
                         f"(only tensors and plain containers are accepted): {error}") from error
    if isinstance(loaded, Mapping) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        for wrapper in ("state_dict", "model"):  # a training checkpoint wrapping the weights
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, expected a state dict (name -> tensor)")
    return dict(loaded)


def _resolve(source: str | Path | Sequence[str | Path] | Mapping[str, str | Path]) -> tuple[Path, Path]:
    """(config path, weights path) from a directory, a (config, weights) pair or a mapping with
    keys ``config`` and ``weights``."""
    if isinstance(source, Mapping):
        if set(source) != {"config", "weights"}:
            raise ValueError(f"explicit paths must be given as {{'config': ..., 'weights': ...}}, got keys {sorted(source)}")
        return Path(source["config"]), Path(source["weights"])
    if isinstance(source, (str, Path)):
        directory = Path(source)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory (expected config.json and model.safetensors or pytorch_model.bin)")
        config = directory / OFFICIAL_CONFIG_NAME
        for name in OFFICIAL_WEIGHT_NAMES:
            if (directory / name).is_file():
                return config, directory / name
        raise FileNotFoundError(f"no weights in {directory}; expected one of {list(OFFICIAL_WEIGHT_NAMES)}")
    if isinstance(source, Sequence) and len(source) == 2:
        return Path(source[0]), Path(source[1])
    raise ValueError(f"expected a directory, a (config, weights) pair or {{'config', 'weights'}} paths, got {source!r}")


def load_official_files(source) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read (official config dict, raw official state dict) from ``source`` (see :func:`convert_official`)."""
    config_path, weights_path = _resolve(source)
    if not config_path.is_file():
        raise FileNotFoundError(f"no official config at {config_path}")
    try:
        official_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    return official_config, _load_weight_file(weights_path)


def _checkpoint_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not _is_ignored(k)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def convert_official(source, dtype: torch.dtype | None = None) -> BasedForCausalLM:
    """An official BASED checkpoint as a linmix model (CPU, eval mode).

    ``source``: a directory with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin``
    (or their ``.index.json`` shards), a ``(config_path, weights_path)`` pair, or
    ``{"config": ..., "weights": ...}``. ``dtype``: the model's dtype; None keeps the checkpoint's
    own floating dtype (fp32 if it mixes several).
    """
    official_config, state_dict = load_official_files(source)
    config = official_config_to_linmix(official_config)
    # The official ShortConvolution carries a bias only when built with the CUDA conv kernel
    # (use_cuda + causal_conv1d); its presence in the file is the reliable signal.
    if any(key.endswith("mixer.conv.conv.bias") for key in normalize_official_keys(state_dict)):
        config.short_conv_bias = True
    model = BasedForCausalLM(config)
    model.to(dtype or _checkpoint_dtype(state_dict))
    load_official_state_dict(model, state_dict)
    return model.eval()


def save_as_linmix(directory_in, directory_out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert an official checkpoint (see :func:`convert_official`) and write it with
    :meth:`BasedForCausalLM.save_pretrained` (config.json + model.safetensors) to ``directory_out``."""
    model = convert_official(directory_in, dtype=dtype)
    return model.save_pretrained(directory_out)
