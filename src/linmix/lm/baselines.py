"""Baselines sized to match a model: the parameter-matched Transformer++ that every BASED comparison
(decode benchmarks, the GPU check, the generation benchmark) sets beside BASED.

    based = preset("based-small")
    transformer = parameter_matched_transformer(based)      # a BasedConfig, all-attention layers
    BasedForCausalLM(transformer)                           # within ~0.1% of BASED's parameter count
"""

from __future__ import annotations

import dataclasses

import torch

from linmix.lm.config import BasedConfig, preset
from linmix.lm.model import BasedForCausalLM

__all__ = ["count_parameters", "parameter_matched_transformer"]

# Above this rough size a model is counted on the meta device (nothing allocated); below it on the
# CPU, because the meta device's first use costs seconds of one-off start-up (torch's reference
# kernels are imported on the first initialiser call), far more than building a small model.
_META_COUNT_THRESHOLD = 20_000_000


def count_parameters(config: BasedConfig) -> int:
    """Parameters of ``BasedForCausalLM(config)`` (tied weights once), without keeping the model and
    without moving the caller's random number generator."""
    rough_size = 12 * config.d_model**2 * config.n_layer + config.vocab_size * config.d_model
    device = "meta" if rough_size > _META_COUNT_THRESHOLD else "cpu"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        return BasedForCausalLM(config).num_parameters()


def parameter_matched_transformer(config: BasedConfig, *, multiple_of: int = 32) -> BasedConfig:
    """A Transformer++ config sized to match ``config``'s parameter count.

    Every layer is global causal softmax attention with rotary positions plus the gated MLP (the
    ``transformer-pp`` presets); width, depth, head count, vocabulary, vocabulary padding and weight
    tying are ``config``'s. The MLP width is the multiple of ``multiple_of`` (at least ``multiple_of``)
    that brings the parameter count closest to ``config``'s: the count is affine in the MLP width, so
    two counts at small widths give it exactly.
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    base = preset(
        "transformer-pp-small",
        d_model=config.d_model,
        n_layer=config.n_layer,
        layer_types=["attention"] * config.n_layer,
        num_heads=config.num_heads,
        vocab_size=config.vocab_size,
        pad_vocab_size_multiple=config.pad_vocab_size_multiple,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    target = count_parameters(config)
    low, high = multiple_of, 2 * multiple_of
    count_low = count_parameters(dataclasses.replace(base, mlp_hidden=low))
    per_unit = (count_parameters(dataclasses.replace(base, mlp_hidden=high)) - count_low) / (high - low)
    exact_width = low + (target - count_low) / per_unit
    return dataclasses.replace(base, mlp_hidden=max(multiple_of, multiple_of * round(exact_width / multiple_of)))
