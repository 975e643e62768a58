"""BasedForCausalLM: the BASED language model (and its baselines), readable top to bottom.

Module names mirror the official checkpoints (``transformer.embeddings.word_embeddings``,
``transformer.layers.{i}.{norm1,mixer,norm2,mlp}``, ``transformer.ln_f``, ``lm_head``), so an
official state dict maps onto it key for key (see :mod:`linmix.lm.convert`).

Shapes: ``input_ids [B, T]`` (int64) -> ``logits [B, T, vocab_size]`` (the padded vocabulary rows
beyond ``vocab_size`` are dropped). The residual stream is kept in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from linmix.layers import (
    BaseConv,
    BasedLinearAttention,
    GatedMLP,
    Mamba,
    MixerState,
    MultiHeadAttention,
    RMSNorm,
    RWKVTimeMix,
    SlidingWindowAttention,
)
from linmix.lm.config import BasedConfig, preset
from linmix.ops._checks import tracing_or_exporting

WEIGHTS_NAME = "model.safetensors"


def build_mixer(config: BasedConfig, layer_type: str, layer_index: int) -> nn.Module:
    """The token mixer of one layer, from its type name (see ``linmix.lm.config.MIXER_TYPES``)."""
    d = config.d_model
    if layer_type == "base_conv":
        return BaseConv(d, kernel_size=config.conv_kernel, expand=config.conv_expand, bias=config.conv_bias,
                        conv_bias=config.short_conv_bias)
    if layer_type == "linear_attention":
        return BasedLinearAttention(d, feature_dim=config.feature_dim, num_heads=config.linear_attention_heads,
                                    feature_map_input_dim=config.feature_map_input_dim, eps=config.linear_attention_eps)
    if layer_type == "sliding_window":
        return SlidingWindowAttention(d, num_heads=config.num_heads, window=config.window,
                                      rotary_fraction=config.rotary_fraction, rotary_base=config.rotary_base,
                                      qkv_bias=config.qkv_bias, out_bias=config.out_bias)
    if layer_type == "attention":
        return MultiHeadAttention(d, num_heads=config.num_heads, rotary_fraction=config.rotary_fraction,
                                  rotary_base=config.rotary_base, qkv_bias=config.qkv_bias, out_bias=config.out_bias)
    if layer_type == "mamba":
        return Mamba(d, d_state=config.mamba_d_state, d_conv=config.mamba_d_conv, expand=config.mamba_expand)
    if layer_type == "rwkv":
        return RWKVTimeMix(d, layer_id=layer_index, num_layers=config.n_layer)
    raise ValueError(f"unknown mixer type {layer_type!r}")


class Block(nn.Module):
    """Pre-norm residual block: ``res += mixer(norm1(res)); res += mlp(norm2(res))`` (res in fp32)."""

    def __init__(self, config: BasedConfig, layer_index: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_index]
        self.norm1 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = build_mixer(config, self.layer_type, layer_index)
        if config.mlp_hidden > 0:
            self.norm2 = RMSNorm(config.d_model, eps=config.norm_eps)
            self.mlp = GatedMLP(config.d_model, config.mlp_hidden, fc1_bias=config.mlp_fc1_bias, fc2_bias=config.mlp_fc2_bias)
        else:
            self.norm2 = self.mlp = None

    def _mlp(self, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.mlp is None:
            return residual
        return residual + self.mlp(self.norm2(residual.to(dtype))).to(residual.dtype)

    def forward(self, residual: torch.Tensor, dtype: torch.dtype, state=None, attention_mask=None, return_state=False):
        mixed = self.mixer(self.norm1(residual.to(dtype)), state, attention_mask=attention_mask, return_state=return_state)
        mixed, new_state = mixed if return_state else (mixed, None)
        residual = self._mlp(residual + mixed.to(residual.dtype), dtype)
        return residual, new_state

    def step(self, residual: torch.Tensor, dtype: torch.dtype, state):
        mixed, state = self.mixer.step(self.norm1(residual.to(dtype)), state)
        return self._mlp(residual + mixed.to(residual.dtype), dtype), state


@dataclasses.dataclass
class LMState:
    """Per-layer recurrent states of a whole model (constant size except for global attention)."""

    layers: list[MixerState]
    seen: int = 0  # tokens consumed so far, padding included

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def clone(self) -> "LMState":
        return LMState([layer.clone() for layer in self.layers], self.seen)


@dataclasses.dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    state: LMState | None = None


class BasedBackbone(nn.Module):
    def __init__(self, config: BasedConfig):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = RMSNorm(config.d_model, eps=config.norm_eps)


class BasedForCausalLM(nn.Module):
    """A causal LM over any per-layer mixer pattern (BASED, Transformer++, Mamba, ... stacks)."""

    def __init__(self, config: BasedConfig):
        super().__init__()
        self.config = config
        self.transformer = BasedBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.embeddings.word_embeddings.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BasedForCausalLM":
        return cls(preset(name, **overrides))

    def reset_parameters(self) -> None:
        """GPT-2 style init (the BASED and Transformer++ references'): normal(0.02) for linears and
        embeddings, output projections scaled by 1/sqrt(2 * n_layer); biases zero. Mixer-specific
        parameters (conv, decays) keep their own init. A mixer with ``reset_parameters_for_lm`` (Mamba)
        is left out of that and gets its own reference's LM init instead, so each architecture starts
        the way its authors train it."""
        std = self.config.initializer_range
        own_init = {name: module for name, module in self.named_modules() if hasattr(module, "reset_parameters_for_lm")}
        for name, module in self.named_modules():
            if any(name.startswith(prefix + ".") for prefix in own_init):
                continue
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("out_proj", "fc2")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        residual_layers = self.config.n_layer * (2 if self.config.mlp_hidden > 0 else 1)
        for module in own_init.values():
            module.reset_parameters_for_lm(residual_layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ------------------------------------------------------------------ inputs
    def _check_ids(self, input_ids: torch.Tensor, layout: str) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor of shape {layout}, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != len(layout.split(",")):
            raise ValueError(f"input_ids must have shape {layout}, got {tuple(input_ids.shape)}")
        # The range check reads values (a host sync, and a graph break under torch.compile): it runs in
        # eager mode only; a compiled or exported model trusts its ids (dtype and shape are still checked).
        if tracing_or_exporting(input_ids):
            return
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size = {self.config.vocab_size}), "
                             f"got values in [{int(input_ids.min())}, {int(input_ids.max())}]")

    def _residual(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings as the residual stream: fp32 at least (fp64 models stay fp64)."""
        embedded = self.transformer.embeddings.word_embeddings(input_ids)
        return embedded.to(torch.promote_types(embedded.dtype, torch.float32))

    def _logits(self, residual: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer.ln_f(residual.to(self.dtype))
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    # ------------------------------------------------------------------ whole sequence
    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, state: LMState | None = None,
                return_state: bool = False, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, V]; with ``labels [B, T]`` also the shifted
        cross-entropy (label -100 ignored). ``attention_mask [B, T]`` marks real tokens (left
        padding). ``state`` continues a sequence; ``return_state`` returns the final one.
        ``logits_to_keep = n > 0`` computes logits for the last n positions only (a long prompt's
        prefill then never materialises [B, T, V]); it cannot be combined with labels."""
        self._check_ids(input_ids, "[B, T]")
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep needs all positions' logits for the loss: pass one or the other")
        if state is not None and len(state.layers) != self.config.n_layer:
            raise ValueError(f"state holds {len(state.layers)} layers, the model has {self.config.n_layer}")
        dtype = self.dtype
        residual = self._residual(input_ids)
        new_states = []
        for i, block in enumerate(self.transformer.layers):
            layer_state = None if state is None else state.layers[i]
            residual, layer_state = block(residual, dtype, layer_state, attention_mask, return_state)
            new_states.append(layer_state)
        logits = self._logits(residual[:, -logits_to_keep:] if logits_to_keep else residual)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out_state = None
        if return_state:
            out_state = LMState(new_states, (0 if state is None else state.seen) + input_ids.shape[1])
        return CausalLMOutput(logits=logits, loss=loss, state=out_state)

    # ------------------------------------------------------------------ recurrence
    def init_state(self, batch_size: int) -> LMState:
        return LMState([block.mixer.init_state(batch_size) for block in self.transformer.layers])

    def step(self, input_ids: torch.Tensor, state: LMState) -> tuple[torch.Tensor, LMState]:
        """One token per row: input_ids [B] -> (logits [B, V], state updated in place)."""
        self._check_ids(input_ids, "[B]")
        dtype = self.dtype
        residual = self._residual(input_ids)
        for i, block in enumerate(self.transformer.layers):
            residual, state.layers[i] = block.step(residual, dtype, state.layers[i])
        state.seen += 1
        return self._logits(residual), state

    def state_size_bytes(self, seq_len: int) -> int:
        """Recurrent state of one sequence at fp32 by the BASED paper's accounting, all layers."""
        return sum(block.mixer.state_size_bytes(seq_len) for block in self.transformer.layers)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Parallel prefill, then recurrent decode; see :func:`linmix.lm.generation.generate`."""
        from linmix.lm.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json and model.safetensors (tied weights stored once)."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        save_model(self, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "BasedForCausalLM":
        """Load a directory written by :meth:`save_pretrained` (config.json + model.safetensors)."""
        from safetensors.torch import load_model

        directory = Path(directory)
        config = BasedConfig.load(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory} (expected the output of save_pretrained)")
        model = cls(config)
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
        missing = [key for key in missing if key != "lm_head.weight" or not config.tie_word_embeddings]
        # Training checkpoints store the tied head under both names (one copy each): the same tensor.
        tied_names = {"lm_head.weight", "transformer.embeddings.word_embeddings.weight"}
        unexpected = [key for key in unexpected if key not in tied_names or not config.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(f"{weights} does not match the config: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        model.to(device)
        if dtype is not None:
            model.to(dtype)
        return model.eval()
