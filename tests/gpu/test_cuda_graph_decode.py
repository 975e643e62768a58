"""The graph-ready decode step equals model.step; on CPU the decoder runs it eagerly (its fallback)."""

import pytest
import torch

from linmix.lm import BasedForCausalLM, preset
from linmix.lm.cuda_graph import GraphedGreedyDecoder, StaticDecodeStep, generate_greedy
from linmix.ops.sliding_window import SlidingWindowCache


def _model(**overrides):
    torch.manual_seed(0)
    model = BasedForCausalLM(preset("based-tiny", **overrides)).eval()
    with torch.no_grad():  # larger weights than the init so that greedy tokens vary
        for parameter in model.parameters():
            parameter.mul_(4.0)
    return model


@torch.no_grad()
def test_static_step_equals_model_step_across_ring_wraps():
    """Teacher-forced tokens through both steps: same logits, same states, for 3 windows' worth of
    tokens (the sliding-window ring buffer wraps; rotary positions come from a device tensor)."""
    model = _model()
    prompt = torch.randint(0, 256, (2, 5))
    reference_state = model(prompt, return_state=True).state
    static_state = reference_state.clone()
    static_step = StaticDecodeStep(model, static_state)
    tokens = torch.randint(0, 256, (3 * model.config.window, 2))
    for token in tokens:
        expected, reference_state = model.step(token, reference_state)
        actual = static_step(token)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    static_step.sync_host_counters(len(tokens))
    assert static_state.seen == reference_state.seen == 5 + len(tokens)
    for mine, theirs in zip(static_state.layers, reference_state.layers):
        for a, b in zip(mine.tensors(), theirs.tensors()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if isinstance(mine, SlidingWindowCache):
            assert mine.seen == theirs.seen


def test_generate_greedy_equals_generate():
    model = _model()
    prompt = torch.randint(0, 256, (3, 7))
    expected = model.generate(prompt, 25)
    actual = generate_greedy(model, prompt, 25)
    assert torch.equal(actual, expected)
    assert len(set(actual[0, 7:].tolist())) > 1  # not a degenerate repeat of one token
    assert torch.equal(generate_greedy(model, prompt, 1), expected[:, :8])
    assert torch.equal(generate_greedy(model, prompt, 0), prompt)


def test_decoder_rejects_what_it_cannot_graph():
    model = _model(layer_types=["base_conv", "attention", "sliding_window", "base_conv"])
    state = model(torch.randint(0, 256, (1, 3)), return_state=True).state
    with pytest.raises(ValueError, match="supports the mixers"):
        StaticDecodeStep(model, state)
    model = _model()
    state = model(torch.randint(0, 256, (1, 3)), return_state=True).state
    with pytest.raises(ValueError, match="needs the model and tokens on a CUDA device"):
        GraphedGreedyDecoder(model, state, torch.zeros(1, dtype=torch.long), use_cuda_graph=True)
    with pytest.raises(ValueError, match="first_token must be an integer tensor"):
        GraphedGreedyDecoder(model, state, torch.zeros(1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(model, torch.zeros(1, 3, dtype=torch.long), -1)
