import pytest

transformers = pytest.importorskip("transformers")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

from linmix.lm import BasedConfig, BasedForCausalLM, preset  # noqa: E402
from linmix.lm.hf import LinmixCache, LinmixForCausalLM, LinmixHFConfig, register  # noqa: E402

ALL_MIXERS = BasedConfig(vocab_size=100, d_model=32, n_layer=6, mlp_hidden=64, num_heads=2, linear_attention_heads=2,
                         feature_dim=8, window=4, tie_word_embeddings=False,
                         layer_types=["base_conv", "linear_attention", "sliding_window", "attention", "mamba", "rwkv"])


def _save_and_load(config: BasedConfig, directory, seed: int = 1):
    torch.manual_seed(seed)
    model = BasedForCausalLM(config).eval()
    model.save_pretrained(directory)
    register()
    return model, AutoModelForCausalLM.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(linmix model, the same directory loaded through AutoModelForCausalLM)."""
    return _save_and_load(preset("based-tiny"), tmp_path_factory.mktemp("based-tiny"))


def _left_padded(prompts, pad_id=17):
    longest = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    return batch, mask


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("config", [preset("based-tiny"), ALL_MIXERS], ids=["based-tiny", "all-mixers"])
def test_config_round_trips_with_based_config(config):
    hf_config = LinmixHFConfig.from_based_config(config)
    assert hf_config.model_type == "linmix_based"
    assert hf_config.to_based_config() == config
    assert hf_config.hidden_size == config.d_model and hf_config.num_hidden_layers == config.n_layer
    # transformers rewrites an attribute named layer_types ("attention" -> "full_attention", ...): ours survive
    values = json.loads(hf_config.to_json_string())
    assert values["layer_types"] == config.layer_types and "mixer_types" not in values
    assert LinmixHFConfig(**values).to_based_config() == config
    assert BasedConfig.from_dict(values) == config  # linmix reads what transformers writes


def test_config_rejects_what_linmix_rejects():
    with pytest.raises(ValueError, match="unknown mixer type"):
        LinmixHFConfig(n_layer=2, layer_types=["base_conv", "lstm"])


# ---------------------------------------------------------------------------------------- loading


def test_auto_classes_load_the_linmix_directory(tiny):
    model, hf_model = tiny
    assert isinstance(hf_model, LinmixForCausalLM) and isinstance(hf_model.config, LinmixHFConfig)
    assert hf_model.config.to_based_config() == model.config
    assert set(hf_model.state_dict()) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(hf_model.state_dict()[name], tensor), name
    assert hf_model.lm_head.weight is hf_model.transformer.embeddings.word_embeddings.weight  # tied
    assert isinstance(AutoConfig.for_model("linmix_based"), LinmixHFConfig)


def test_logits_equal_linmix(tiny):
    model, hf_model = tiny
    ids = torch.randint(0, 256, (2, 13))
    batch, mask = _left_padded([ids[0, :5], ids[1]])
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, model(ids).logits)
        hf_out = hf_model(batch, attention_mask=mask, return_dict=True)
        expected = model(batch, attention_mask=mask).logits
    assert hf_out.logits.shape == (2, 13, 256)
    assert torch.equal(hf_out.logits[mask.bool()], expected[mask.bool()])


def test_loss_with_labels_equals_linmix(tiny):
    model, hf_model = tiny
    ids = torch.randint(0, 256, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        expected = model(ids, labels=labels).loss
        out = hf_model(ids, labels=labels)
        loss, logits = hf_model(ids, labels=labels, return_dict=False)
    assert torch.equal(out.loss, expected) and torch.equal(loss, expected)
    assert torch.equal(logits, out.logits)


def test_untied_head_and_every_mixer_type(tmp_path):
    model, hf_model = _save_and_load(ALL_MIXERS, tmp_path)
    assert hf_model.lm_head.weight is not hf_model.transformer.embeddings.word_embeddings.weight
    assert torch.equal(hf_model.lm_head.weight, model.lm_head.weight)
    batch, mask = _left_padded([torch.randint(0, 100, (n,)) for n in (4, 9)])
    with torch.no_grad():
        assert torch.equal(hf_model(batch[1:]).logits, model(batch[1:]).logits)
    expected = model.generate(batch, 6, attention_mask=mask)
    assert torch.equal(hf_model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)


def test_checkpoint_that_does_not_match_the_config_raises(tmp_path):
    torch.manual_seed(0)
    BasedForCausalLM(preset("based-tiny")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layer"], config["layer_types"] = 3, config["layer_types"][:3]
    (tmp_path / "config.json").write_text(json.dumps(config))
    register()
    with pytest.raises(ValueError, match="unexpected_keys"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_transformers_save_pretrained_loads_back_in_linmix(tiny, tmp_path):
    model, hf_model = tiny
    hf_model.save_pretrained(tmp_path)
    again = BasedForCausalLM.from_pretrained(tmp_path)
    assert again.config == model.config
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_from_linmix_shares_the_modules():
    torch.manual_seed(0)
    model = BasedForCausalLM(preset("based-tiny")).eval()
    wrapper = LinmixForCausalLM.from_linmix(model)
    assert wrapper.transformer is model.transformer and wrapper.lm_head is model.lm_head
    assert not wrapper.training and wrapper.device.type == "cpu"
    ids = torch.randint(0, 256, (1, 5))
    assert torch.equal(wrapper.generate(ids, max_new_tokens=4, do_sample=False), model.generate(ids, 4))


# ---------------------------------------------------------------------------------------- generation


def test_greedy_generate_equals_linmix_generate(tiny):
    model, hf_model = tiny
    prompt = torch.randint(0, 256, (1, 7))
    expected = model.generate(prompt, 16)
    assert torch.equal(hf_model.generate(prompt, max_new_tokens=16, do_sample=False), expected)


def test_greedy_generate_left_padded_batch_equals_linmix(tiny):
    model, hf_model = tiny
    prompts = [torch.randint(0, 256, (n,)) for n in (4, 10)]
    batch, mask = _left_padded(prompts)
    expected = model.generate(batch, 12, attention_mask=mask)
    actual = hf_model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(actual, expected)
    alone = model.generate(prompts[0][None], 12)  # padding changes nothing
    assert torch.equal(actual[0, -12:], alone[0, -12:])


def test_generate_prefills_once_then_steps_in_constant_memory(tiny, monkeypatch):
    model, hf_model = tiny
    linmix = hf_model.linmix_model
    calls = {"forward": [], "step": 0}
    forward, step = linmix.forward, linmix.step

    def counting_forward(input_ids, **kwargs):
        calls["forward"].append(tuple(input_ids.shape))
        return forward(input_ids, **kwargs)

    def counting_step(input_ids, state):
        calls["step"] += 1
        return step(input_ids, state)

    monkeypatch.setattr(linmix, "forward", counting_forward)
    monkeypatch.setattr(linmix, "step", counting_step)
    prompt = torch.randint(0, 256, (2, 6))
    caches = {}
    for new_tokens in (8, 40):
        calls["forward"].clear()
        calls["step"] = 0
        out = hf_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
        assert out.sequences.shape == (2, 6 + new_tokens)
        assert calls["forward"] == [(2, 6)] and calls["step"] == new_tokens - 1  # one prefill, then one token a call
        caches[new_tokens] = out.cache
    assert isinstance(caches[8], LinmixCache)
    assert caches[8].get_seq_length() == 6 + 7 and caches[40].get_seq_length() == 6 + 39
    assert caches[8].nbytes() == caches[40].nbytes() > 0


def test_generate_continues_a_returned_cache(tiny):
    _, hf_model = tiny
    prompt = torch.randint(0, 256, (1, 5))
    first = hf_model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    continued = hf_model.generate(first.sequences, cache=first.cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(continued, hf_model.generate(prompt, max_new_tokens=12, do_sample=False))


def test_beam_search_reorders_the_state(tiny):
    _, hf_model = tiny
    prompt = torch.randint(0, 256, (2, 5))
    cached = hf_model.generate(prompt, num_beams=3, max_new_tokens=6, do_sample=False)
    uncached = hf_model.generate(prompt, num_beams=3, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_sampling_runs_and_follows_the_seed(tiny):
    _, hf_model = tiny
    prompt = torch.randint(0, 256, (2, 5))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(hf_model.generate(prompt, do_sample=True, top_k=20, temperature=0.8, max_new_tokens=6,
                                      num_return_sequences=2))
    assert runs[0].shape == (4, 11) and torch.equal(runs[0], runs[1])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < 256


# ---------------------------------------------------------------------------------------- errors


def test_clear_errors(tiny):
    _, hf_model = tiny
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(TypeError, match="LinmixCache"):
        hf_model(ids, cache=DynamicCache())
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf_model(ids, inputs_embeds=torch.zeros(1, 4, 64))
    cache = hf_model(ids, use_cache=True).cache
    with pytest.raises(ValueError, match="padding"):
        hf_model(ids[:, :1], cache=cache, attention_mask=torch.tensor([[1, 1, 1, 1, 0]]))


def test_linmix_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import linmix, linmix.lm\n"
        "try:\n"
        "    import linmix.lm.hf\n"
        "except ImportError as error:\n"
        "    assert 'linmix[hf]' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('linmix.lm.hf imported without transformers')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
