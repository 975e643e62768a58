"""The MQAR study's models: two layers (a short gated conv, then the mixer under test), no MLP.

``MQARModel`` (spec/BASED.md section 4)::

    h = embedding(input_ids)                         # no position embedding
    h = h + short_conv(LayerNorm(h))                 # layer 0: BaseConv, d channels, kernel 3
    h = h + mixer(LayerNorm(h))                      # layer 1: the mixer of the sweep point
    logits = LayerNorm(h) @ embedding.weight.T       # tied head, applied only where it is needed

Mixers (``MQARModelConfig.mixer``), all from :mod:`linmix.layers` except the long convolution:

- ``attention``: global softmax attention, 1 head, no rotary (position comes from the conv);
- ``based``: Taylor linear attention, 1 head of width d, feature dim f (8/16/24);
- ``based_window``: ``based`` plus sliding-window attention of ``window`` tokens, summed;
- ``sliding_window``: sliding-window softmax attention alone;
- ``mamba``: Mamba-1 with state size ``d_state`` (expand 2, conv 4);
- ``rwkv``: RWKV-4 time mixing (its state is a vector per channel, see :func:`state_size_bytes`);
- ``rwkv5``: RWKV-5-style time mixing with a matrix-valued state per head (``num_heads`` heads);
- ``base_conv``: BaseConv with a long causal convolution (explicit filter over the whole sequence,
  via FFT): the Hyena/H3-style gated convolution.

State size (:func:`state_size_bytes`) is the spec's accounting, 4 bytes a number, summed over both
layers at a given sequence length: short conv d*k; attention 2*d*L; sliding window 2*d*w; BASED
h*head_dim*D' + h*D'; Mamba 2*d*d_state; long conv d*L; RWKV-5 heads*head_dim^2; RWKV-4 4*d
(a, b, p and the shifted token: its own accounting, since its state is a vector).
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from torch import nn

from linmix.layers import BaseConv, BasedLinearAttention, Mamba, MultiHeadAttention, RWKVTimeMix, SlidingWindowAttention
from linmix.layers.rwkv5 import RWKV5TimeMix
from linmix.mqar.data import IGNORE_INDEX

__all__ = ["MIXERS", "LongConv", "MQARModel", "MQARModelConfig", "masked_recall_loss", "state_size_bytes"]

MIXERS = ("attention", "based", "based_window", "sliding_window", "mamba", "rwkv", "rwkv5", "base_conv")
SHORT_CONV_KERNEL = 3


@dataclasses.dataclass
class MQARModelConfig:
    """One sweep point's architecture. Fields a mixer does not use are ignored (and left out of its name)."""

    mixer: str
    d_model: int
    feature_dim: int = 16  # based, based_window
    window: int = 0  # sliding_window, based_window: tokens before the current one each query sees
    d_state: int = 16  # mamba
    num_heads: int = 1

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {', '.join(MIXERS)}, got {self.mixer!r}")
        if isinstance(self.d_model, bool) or not isinstance(self.d_model, int) or self.d_model <= 0:
            raise ValueError(f"d_model must be a positive integer, got {self.d_model!r}")
        if self.mixer in ("sliding_window", "based_window") and self.window <= 0:
            raise ValueError(f"mixer {self.mixer!r} needs window > 0, got {self.window}")

    @property
    def name(self) -> str:
        """A stable, readable id, e.g. ``based_d64_f16`` or ``sliding_window_d64_w32``."""
        parts = [self.mixer, f"d{self.d_model}"]
        if self.mixer in ("based", "based_window"):
            parts.append(f"f{self.feature_dim}")
        if self.mixer in ("sliding_window", "based_window"):
            parts.append(f"w{self.window}")
        if self.mixer == "mamba":
            parts.append(f"n{self.d_state}")
        if self.num_heads != 1:
            parts.append(f"h{self.num_heads}")
        return "_".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MQARModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MQARModelConfig fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class LongConv(nn.Module):
    """Hyena/H3-style gated long convolution: ``x [B, T, d] -> [B, T, d]``.

    ``u, gate = in_proj(x)``; ``y = out_proj(causal_conv(u, filter) * gate)`` with an explicit
    per-channel filter ``[d, max_len]`` as long as the sequence, applied by FFT. Its recurrent state
    is the whole input history, d*L numbers (the paper's Hyena accounting).
    """

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.in_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        # Filters start short-ranged (exponentially decaying, as Hyena's modulation does) and may learn to reach far.
        decay = torch.exp(-torch.arange(max_len, dtype=torch.float32)[None, :] / torch.logspace(0, 2, d_model)[:, None])
        self.filter = nn.Parameter(torch.randn(d_model, max_len) * decay / max_len ** 0.5)
        self.skip = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the long convolution's max_len {self.max_len}")
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        size = 2 * length  # zero-padded: linear (causal) rather than circular convolution
        spectrum = torch.fft.rfft(u.float().transpose(1, 2), n=size) * torch.fft.rfft(self.filter[:, :length].float(), n=size)
        conv = torch.fft.irfft(spectrum, n=size)[..., :length].transpose(1, 2).to(x.dtype)
        return self.out_proj((conv + u * self.skip) * gate)

    def state_size_bytes(self, seq_len: int) -> int:
        return 4 * self.d_model * seq_len


class _SumOfMixers(nn.Module):
    """Runs several mixers on the same input and adds their outputs (BASED + sliding window in one layer)."""

    def __init__(self, *mixers: nn.Module):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(mixer(x) for mixer in self.mixers)

    def state_size_bytes(self, seq_len: int) -> int:
        return sum(mixer.state_size_bytes(seq_len) for mixer in self.mixers)


def _build_mixer(config: MQARModelConfig, max_len: int) -> nn.Module:
    d, heads = config.d_model, config.num_heads
    if config.mixer == "attention":
        return MultiHeadAttention(d, heads, rotary_fraction=0.0)
    if config.mixer == "based":
        return BasedLinearAttention(d, feature_dim=config.feature_dim, num_heads=heads)
    if config.mixer == "based_window":
        return _SumOfMixers(
            BasedLinearAttention(d, feature_dim=config.feature_dim, num_heads=heads),
            SlidingWindowAttention(d, heads, window=config.window, rotary_fraction=0.0),
        )
    if config.mixer == "sliding_window":
        return SlidingWindowAttention(d, heads, window=config.window, rotary_fraction=0.0)
    if config.mixer == "mamba":
        return Mamba(d, d_state=config.d_state)
    if config.mixer == "rwkv":
        return RWKVTimeMix(d, layer_id=1, num_layers=2)
    if config.mixer == "rwkv5":
        return RWKV5TimeMix(d, num_heads=heads, layer_id=1, num_layers=2)
    return LongConv(d, max_len)


class MQARModel(nn.Module):
    """Two-layer MQAR model; see the module docstring. ``max_len`` bounds the long convolution only."""

    def __init__(self, config: MQARModelConfig, vocab_size: int, max_len: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        d = config.d_model
        self.embedding = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        self.mixers = nn.ModuleList([BaseConv(d, kernel_size=SHORT_CONV_KERNEL, expand=1), _build_mixer(config, max_len)])
        self.final_norm = nn.LayerNorm(d)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> final normed hidden states [B, T, d]."""
        h = self.embedding(input_ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.final_norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V] through the tied head."""
        return hidden @ self.embedding.weight.T

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] at every position (for inspection; training uses
        :func:`masked_recall_loss`, which applies the head only at query positions)."""
        return self.logits(self.hidden_states(input_ids))

    def state_size_bytes(self, seq_len: int) -> int:
        return sum(mixer.state_size_bytes(seq_len) for mixer in self.mixers)


def state_size_bytes(config: MQARModelConfig, seq_len: int, vocab_size: int = 2) -> int:
    """Recurrent state in bytes of the model ``config`` at sequence length ``seq_len`` (both layers)."""
    model = MQARModel(config, vocab_size, seq_len)  # tiny: building it is cheaper than the meta device's first use
    return model.state_size_bytes(seq_len)


def masked_recall_loss(model: MQARModel, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy on the logits at labelled positions only.

    input_ids, labels: [B, T] (labels -100 where nothing is asked). The head is applied to the
    M labelled positions alone ([M, d] -> [M, V]), which is what makes training cheap.
    Returns ``(loss, predictions [M], targets [M])``; the mean is over labelled positions.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids and labels must have the same shape [B, T], got {tuple(input_ids.shape)} and {tuple(labels.shape)}")
    hidden = model.hidden_states(input_ids)
    positions = labels != IGNORE_INDEX
    targets = labels[positions]
    logits = model.logits(hidden[positions])  # [M, V]
    loss = F.cross_entropy(logits.float(), targets)
    return loss, logits.argmax(dim=-1), targets
