"""BasedConfig: one dataclass describes BASED and every baseline stack (the mixer pattern is data).

``layer_types[i]`` names the token mixer of layer ``i``: ``"base_conv"``, ``"linear_attention"``,
``"sliding_window"``, ``"attention"`` (global causal softmax attention with rotary, as in
Transformer++), ``"mamba"`` or ``"rwkv"``. Every layer is a pre-norm residual block
``res += mixer(norm1(res)); res += mlp(norm2(res))`` (the MLP is optional), with a final RMSNorm and
a tied LM head. The config round-trips through config.json (:meth:`save` / :meth:`load`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

MIXER_TYPES = ("base_conv", "linear_attention", "sliding_window", "attention", "mamba", "rwkv")
CONFIG_NAME = "config.json"


@dataclasses.dataclass
class BasedConfig:
    """Hyper-parameters of a linmix causal LM. Defaults are based-360m's."""

    vocab_size: int = 50257
    pad_vocab_size_multiple: int = 8
    d_model: int = 1024
    n_layer: int = 27
    layer_types: list[str] = dataclasses.field(default_factory=list)
    # MLP (gated SiLU): fc1 d -> 2 * mlp_hidden; 0 disables the MLP (MQAR models have none).
    mlp_hidden: int = 2048
    mlp_fc1_bias: bool = False
    mlp_fc2_bias: bool = False
    norm_eps: float = 1e-5
    # BaseConv
    conv_kernel: int = 3
    conv_expand: int = 2
    conv_bias: bool = True  # in_proj / out_proj biases
    short_conv_bias: bool = False  # bias of the depthwise conv itself (official CUDA-kernel builds)
    # Taylor linear attention
    linear_attention_heads: int = 16
    feature_dim: int = 16
    feature_map_input_dim: int | None = None
    linear_attention_eps: float = 1e-12
    # Softmax attention (sliding window and global)
    num_heads: int = 16
    window: int = 128  # keys seen before each query; the official window_size is 2 * window
    rotary_base: float = 10000.0
    rotary_fraction: float = 1.0
    qkv_bias: bool = False
    out_bias: bool = False
    # Mamba
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    # Initialisation
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = based_layer_types(self.n_layer, linear_attention=(), sliding_window=())
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types must list n_layer = {self.n_layer} mixers, got {len(self.layer_types)}")
        unknown = sorted(set(self.layer_types) - set(MIXER_TYPES))
        if unknown:
            raise ValueError(f"unknown mixer type(s) {unknown}; expected each of layer_types in {list(MIXER_TYPES)}")
        for name in ("vocab_size", "d_model", "n_layer", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.mlp_hidden < 0:
            raise ValueError(f"mlp_hidden must be >= 0 (0 = no MLP), got {self.mlp_hidden}")

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.pad_vocab_size_multiple
        return -(-self.vocab_size // multiple) * multiple

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "linmix_based", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BasedConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(values) - known - {"model_type", "architectures", "transformers_version", "auto_map", "torch_dtype", "dtype"})
        if extra:
            raise ValueError(f"unknown BasedConfig field(s) {extra}; expected fields: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "BasedConfig":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(values)


def based_layer_types(n_layer: int, linear_attention, sliding_window) -> list[str]:
    """BaseConv everywhere except the listed layers (sliding window wins where both list a layer,
    as in the official model)."""
    types = []
    for i in range(n_layer):
        if i in sliding_window:
            types.append("sliding_window")
        elif i in linear_attention:
            types.append("linear_attention")
        else:
            types.append("base_conv")
    return types


def _based(d_model, n_layer, linear_layers, window_layers, **kwargs) -> BasedConfig:
    return BasedConfig(d_model=d_model, n_layer=n_layer, mlp_hidden=2 * d_model,
                       layer_types=based_layer_types(n_layer, linear_layers, window_layers), **kwargs)


def _uniform(mixer: str, d_model: int, n_layer: int, **kwargs) -> BasedConfig:
    return BasedConfig(d_model=d_model, n_layer=n_layer, mlp_hidden=kwargs.pop("mlp_hidden", 2 * d_model),
                       layer_types=[mixer] * n_layer, **kwargs)


PRESETS = {
    # The paper's models (layer indices 0-based, as in the released configs).
    "based-360m": lambda: _based(1024, 27, (1, 6, 11, 16, 21), (2, 7, 12, 17, 22)),
    "based-1b": lambda: _based(1792, 36, (1, 6, 11, 16, 21, 27, 33), (2, 7, 12, 17, 22, 28, 34)),
    # Llama-style baseline: attention + SwiGLU in every layer (the MLP width keeps params comparable).
    "transformer-pp-360m": lambda: _uniform("attention", 1024, 24, mlp_hidden=2816),
    # Small models for CPU work and tests.
    "based-small": lambda: _based(256, 8, (1, 5), (2, 6), vocab_size=50257, linear_attention_heads=4, num_heads=4,
                                  feature_dim=16, window=64),
    # The four *-small LMs are equal-size peers (linmix lm train; docs/lm.md): with the byte
    # vocabulary (257) each is within 0.1% of based-small's 5,653,760 parameters.
    # mlp_hidden 568 (not 2 d = 512) makes up for attention's missing BaseConv / feature-map weights.
    "transformer-pp-small": lambda: _uniform("attention", 256, 8, num_heads=4, mlp_hidden=568),
    # Sized as the Mamba paper sizes Mamba against Transformers: Mamba blocks without MLPs, more of
    # them; 12 layers at d 264 land closest (13 at d 256 would be 1.9% over, 12 at d 256 5.8% under).
    "mamba-small": lambda: _uniform("mamba", 264, 12, mlp_hidden=0),
    "sliding-window-small": lambda: _uniform("sliding_window", 256, 8, num_heads=4, window=64, mlp_hidden=568),
    "base-conv-small": lambda: _uniform("base_conv", 256, 8),
    "based-tiny": lambda: _based(64, 4, (1,), (2,), vocab_size=256, linear_attention_heads=2, num_heads=2,
                                 feature_dim=8, window=8),
}


def preset(name: str, **overrides) -> BasedConfig:
    """A named configuration (``sorted(PRESETS)`` lists them), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    return dataclasses.replace(config, **overrides) if overrides else config
