import pytest
import torch

from helpers import assert_close_rms
from linmix.lm import BasedForCausalLM, preset
from linmix.lm.generation import sample_next_token


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return BasedForCausalLM(preset("based-tiny")).eval()


def test_greedy_decode_logits_equal_full_forward(model):
    prompt = torch.randint(0, 256, (2, 7))
    sequences, scores = model.generate(prompt, 12, return_scores=True)
    assert sequences.shape == (2, 19) and torch.equal(sequences[:, :7], prompt)
    with torch.no_grad():
        full = model(sequences).logits
    for i, step_logits in enumerate(scores):
        assert_close_rms(step_logits, full[:, 6 + i], 1e-5, f"step {i}")
    assert torch.equal(sequences[:, 7:], torch.stack([s.argmax(-1) for s in scores], 1))


def test_decode_memory_does_not_grow(model):
    prompt = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        out = model(prompt, return_state=True)
        state = out.state
        token = out.logits[:, -1].argmax(-1)
        sizes = {}
        for n in range(1, 1025):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
            if n in (16, 1024):
                sizes[n] = state.nbytes()
    assert sizes[16] == sizes[1024] > 0


def test_left_padded_batch_generates_what_each_row_generates_alone(model):
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 9, 6)]
    longest = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, longest - len(prompt):] = prompt
        batch[row, : longest - len(prompt)] = 17  # arbitrary pad id: must not matter
        mask[row, longest - len(prompt):] = 1
    together = model.generate(batch, 20, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 20)
        assert torch.equal(together[row, longest:], alone[0, len(prompt):]), f"row {row}"


def test_eos_stops_and_pads(model):
    prompt = torch.randint(0, 256, (2, 4))
    free = model.generate(prompt, 10)
    eos = int(free[0, 6])  # row 0 emits this as its 3rd new token
    out = model.generate(prompt, 10, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert first <= 2 and all(t == 0 for t in row0[first + 1:])


def test_sampling_is_seeded_and_filters(model):
    prompt = torch.randint(0, 256, (2, 4))
    a = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.9, -2.0]])
    for seed in range(20):
        token = sample_next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(seed))
        assert int(token) in (2, 3)
        token = sample_next_token(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(seed))
        assert int(token) == 2  # token 2 alone holds > 50% of the mass
    assert int(sample_next_token(logits, temperature=0.0)) == 2


def test_generate_bad_input(model):
    prompt = torch.randint(0, 256, (2, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(prompt, 2, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(prompt, 2, attention_mask=torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        model.generate(prompt[0], 2)
    assert torch.equal(model.generate(prompt, 0), prompt)


@pytest.mark.parametrize("name", ["based-tiny", "transformer-pp-small", "mamba-small", "sliding-window-small"])
def test_chunked_prefill_equals_whole_prefill_with_left_padding(name):
    base = preset(name)
    config = preset(name, vocab_size=97, d_model=32, n_layer=3, window=4,
                    layer_types=base.layer_types[:3] if name == "based-tiny" else base.layer_types[:1] * 3,
                    mlp_hidden=0 if base.mlp_hidden == 0 else 48)
    model = BasedForCausalLM(config).eval()
    batch = torch.randint(0, 97, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :7] = 0  # row 0: 7 pad tokens, longer than a prefill chunk
    whole, whole_scores = model.generate(batch, 6, attention_mask=mask, prefill_chunk_size=None, return_scores=True)
    for chunk in (1, 3, 5):
        chunked, scores = model.generate(batch, 6, attention_mask=mask, prefill_chunk_size=chunk, return_scores=True)
        assert torch.equal(chunked, whole), f"chunk {chunk}"
        assert_close_rms(torch.stack(scores), torch.stack(whole_scores), 1e-5, f"chunk {chunk}")
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        model.generate(batch, 2, prefill_chunk_size=0)
