"""linmix.lm.baselines: the parameter-matched Transformer++ is the closest all-attention model to
BASED's parameter count among MLP widths on the grid, whichever device counts it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from linmix.lm import BasedForCausalLM, preset
from linmix.lm import baselines
from linmix.lm.baselines import count_parameters, parameter_matched_transformer


def built_count(config) -> int:
    return BasedForCausalLM(config).num_parameters()


@pytest.mark.parametrize("multiple_of", [8, 32])
def test_matched_width_is_the_best_on_its_grid(multiple_of):
    based = preset("based-tiny", vocab_size=300, pad_vocab_size_multiple=16)
    matched = parameter_matched_transformer(based, multiple_of=multiple_of)
    assert matched.layer_types == ["attention"] * based.n_layer
    assert (matched.d_model, matched.n_layer, matched.num_heads) == (based.d_model, based.n_layer, based.num_heads)
    assert (matched.vocab_size, matched.padded_vocab_size, matched.tie_word_embeddings) == (300, based.padded_vocab_size, True)
    assert matched.mlp_hidden % multiple_of == 0
    target = built_count(based)
    # Brute force over the grid: no other width is closer to BASED's count.
    gaps = {h: abs(built_count(dataclasses.replace(matched, mlp_hidden=h)) - target) for h in range(multiple_of, 8 * based.d_model + 1, multiple_of)}
    assert gaps[matched.mlp_hidden] == min(gaps.values())


def test_counting_leaves_the_random_stream_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    parameter_matched_transformer(preset("based-tiny"))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow  # the meta device's first use in a process costs several seconds of start-up
def test_meta_and_cpu_counts_agree(monkeypatch):
    config = preset("based-tiny", vocab_size=1000)
    cpu = built_count(config)
    monkeypatch.setattr(baselines, "_META_COUNT_THRESHOLD", 0)  # force the meta device
    assert count_parameters(config) == cpu


def test_bad_grid():
    with pytest.raises(ValueError, match="multiple_of"):
        parameter_matched_transformer(preset("based-tiny"), multiple_of=0)
