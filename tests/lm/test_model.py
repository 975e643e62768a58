import json
import math

import pytest
import torch

from helpers import assert_close_rms
from linmix.lm import BasedConfig, BasedForCausalLM, preset
from linmix.lm.config import PRESETS


def _tiny(**overrides):
    return BasedForCausalLM(preset("based-tiny", **overrides))


# ---------------------------------------------------------------- config
def test_config_round_trips_through_json(tmp_path):
    config = preset("based-360m")
    path = config.save(tmp_path)
    assert json.loads(path.read_text())["model_type"] == "linmix_based"
    assert BasedConfig.load(tmp_path) == config


def test_presets_have_the_spec_layer_patterns():
    config = preset("based-360m")
    assert [i for i, t in enumerate(config.layer_types) if t == "linear_attention"] == [1, 6, 11, 16, 21]
    assert [i for i, t in enumerate(config.layer_types) if t == "sliding_window"] == [2, 7, 12, 17, 22]
    assert config.padded_vocab_size == 50264 and config.window == 128
    big = preset("based-1b")
    assert (big.d_model, big.n_layer) == (1792, 36)
    assert [i for i, t in enumerate(big.layer_types) if t == "linear_attention"] == [1, 6, 11, 16, 21, 27, 33]
    assert [i for i, t in enumerate(big.layer_types) if t == "sliding_window"] == [2, 7, 12, 17, 22, 28, 34]


@pytest.mark.parametrize("name, expected", [("based-360m", 363e6), ("based-1b", 1.35e9), ("transformer-pp-360m", 363e6)])
def test_preset_parameter_counts_on_meta_device(name, expected):
    with torch.device("meta"):
        model = BasedForCausalLM(preset(name))
    assert model.num_parameters() == pytest.approx(expected, rel=0.01)


def test_small_presets_are_parameter_matched_with_the_byte_vocabulary():
    # based-small, Transformer++, Mamba and sliding-window-only stacks train as equal-size peers
    counts = {}
    for name in ("based-small", "transformer-pp-small", "mamba-small", "sliding-window-small"):
        with torch.device("meta"):
            counts[name] = BasedForCausalLM.from_preset(name, vocab_size=257).num_parameters()
    assert counts["based-small"] == 5_653_760
    assert counts == {"based-small": 5_653_760, "transformer-pp-small": 5_658_880, "mamba-small": 5_655_144,
                      "sliding-window-small": 5_658_880}
    for name, count in counts.items():
        assert count == pytest.approx(counts["based-small"], rel=0.02), name
    assert preset("mamba-small").mlp_hidden == 0 and set(preset("mamba-small").layer_types) == {"mamba"}


def test_config_errors_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="n_layer = 3"):
        BasedConfig(n_layer=3, layer_types=["base_conv"])
    with pytest.raises(ValueError, match="unknown mixer"):
        BasedConfig(n_layer=1, layer_types=["lstm"])
    with pytest.raises(ValueError, match="unknown preset"):
        preset("based-7b")
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        BasedConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        BasedConfig.load(tmp_path / "missing")


# ---------------------------------------------------------------- model
def _manual_forward(model, ids):
    """The model's forward composed by hand from its modules: embed, pre-norm residual blocks, final
    norm, head (padded vocabulary rows dropped)."""
    layers = model.transformer
    residual = layers.embeddings.word_embeddings(ids)
    for block in layers.layers:
        residual = residual + block.mixer(block.norm1(residual))
        if block.mlp is not None:
            residual = residual + block.mlp(block.norm2(residual))
    return model.lm_head(layers.ln_f(residual))[..., : model.config.vocab_size]


def _shifted_cross_entropy(logits, ids):
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("name", ["based-tiny", "transformer-pp-small", "mamba-small", "sliding-window-small", "base-conv-small"])
def test_every_stack_runs_forward_and_backward(name):
    base = preset(name)
    config = preset(name, vocab_size=97, n_layer=2, layer_types=base.layer_types[:2],
                    d_model=32, mlp_hidden=0 if base.mlp_hidden == 0 else 64)
    # fp64 so that finite differences can check the gradients (the loss itself is taken in fp32).
    model = BasedForCausalLM(config).double()
    ids = torch.randint(0, 97, (2, 11))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 11, 97)
    expected_logits = _manual_forward(model, ids)
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, _shifted_cross_entropy(expected_logits.float(), ids))

    # Causal: changing the tokens from position 6 on leaves the logits before it exactly as they were.
    changed = ids.clone()
    changed[:, 6:] = (ids[:, 6:] + 1) % 97
    with torch.no_grad():
        changed_logits = model(changed).logits
    torch.testing.assert_close(changed_logits[:, :6], out.logits[:, :6].detach(), rtol=1e-12, atol=1e-12)
    assert (changed_logits[:, 6] - out.logits[:, 6]).abs().amax(-1).min() > 1e-6

    out.loss.backward()
    # Every parameter gets a nonzero gradient; the gradients of the embedding, of each block and of the
    # final norm match central finite differences of the fp64 loss along a random direction.
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters()), \
        [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    groups = [model.transformer.embeddings, *model.transformer.layers, model.transformer.ln_f]
    step = 1e-6
    with torch.no_grad():
        for group in groups:
            parameters = list(group.parameters())
            directions = [torch.randn_like(p) for p in parameters]

            def loss_moved_by(scale):
                for p, d in zip(parameters, directions):
                    p.add_(scale * step * d)
                return _shifted_cross_entropy(model(ids).logits, ids)

            plus, minus = loss_moved_by(1), loss_moved_by(-2)
            loss_moved_by(1)  # back to the original parameters
            numeric = (plus - minus) / (2 * step)
            analytic = sum((p.grad * d).sum() for p, d in zip(parameters, directions))
            assert abs(float(numeric - analytic)) <= 1e-4 * abs(float(analytic)), (type(group).__name__, float(numeric), float(analytic))


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 256)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)


def test_head_is_tied_and_padded_vocab_dropped():
    model = _tiny(vocab_size=250)
    assert model.lm_head.weight is model.transformer.embeddings.word_embeddings.weight
    assert model.lm_head.weight.shape[0] == 256
    assert model(torch.randint(0, 250, (1, 4))).logits.shape[-1] == 250


def test_save_and_load_pretrained(tmp_path):
    model = _tiny().eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = BasedForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 13))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.transformer.embeddings.word_embeddings.weight


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BasedForCausalLM.from_pretrained(tmp_path)
    preset("based-tiny").save(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BasedForCausalLM.from_pretrained(tmp_path)
    _tiny(n_layer=2, layer_types=["base_conv", "linear_attention"]).save_pretrained(tmp_path / "other")
    preset("based-tiny").save(tmp_path / "other")  # config no longer matches the weights
    with pytest.raises(ValueError, match="missing keys"):
        BasedForCausalLM.from_pretrained(tmp_path / "other")


def test_bad_input_ids():
    model = _tiny()
    with pytest.raises(ValueError, match=r"integer tensor of shape \[B, T\]"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        model(torch.randint(0, 256, (5,)))
    with pytest.raises(ValueError, match=r"\[0, vocab_size = 256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="labels"):
        model(torch.randint(0, 256, (2, 5)), labels=torch.randint(0, 256, (2, 4)))


# ---------------------------------------------------------------- recurrence
@pytest.mark.parametrize("name", ["based-tiny", "transformer-pp-small", "mamba-small", "sliding-window-small"])
def test_step_logits_equal_forward_logits(name):
    base = preset(name)
    config = preset(name, vocab_size=61, d_model=32, n_layer=3, layer_types=(base.layer_types * 3)[:3] if name != "based-tiny" else base.layer_types[:3],
                    mlp_hidden=0 if base.mlp_hidden == 0 else 48, window=4)
    model = BasedForCausalLM(config).eval()
    ids = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        state = model.init_state(2)
        steps = []
        for t in range(14):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
        assert_close_rms(torch.stack(steps, 1), full, 1e-5)
        head = model(ids[:, :6], return_state=True)
        tail = model(ids[:, 6:], state=head.state).logits
        assert_close_rms(torch.cat([head.logits, tail], 1), full, 1e-5)


def test_state_size_bytes_follow_the_paper_accounting():
    model = _tiny()
    total = sum(block.mixer.state_size_bytes(100) for block in model.transformer.layers)
    assert model.state_size_bytes(100) == total
    assert model.state_size_bytes(100) == model.state_size_bytes(10_000)  # BASED: constant in length


def test_logits_to_keep_returns_the_last_positions_only():
    model = _tiny().eval()
    ids = torch.randint(0, 256, (2, 9))
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 256)
    torch.testing.assert_close(last, full[:, -1:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_model_init_keeps_mambas_timescale_init():
    # The model-wide GPT-2 init must not zero dt_proj.bias (softplus(0) = 0.69 for every channel: one fast
    # timescale, no long memory) nor replace dt_proj.weight's uniform(+-dt_rank^-0.5) with normal(0.02).
    torch.manual_seed(0)
    model = BasedForCausalLM.from_preset("mamba-small", vocab_size=257)
    layers = [m for m in model.modules() if type(m).__name__ == "Mamba"]
    assert len(layers) == model.config.n_layer
    for layer in layers:
        delta = torch.nn.functional.softplus(layer.dt_proj.bias.detach())
        assert float(delta.min()) >= 1e-4 - 1e-9 and float(delta.max()) <= 0.1 + 1e-6
        # log-uniform in [0.001, 0.1]: the median timescale is near 0.01, far from softplus(0)
        assert 0.005 < float(delta.median()) < 0.02
        bound = layer.dt_rank ** -0.5
        weight = layer.dt_proj.weight.detach()
        assert float(weight.abs().max()) <= bound and float(weight.std()) > 0.5 * bound / math.sqrt(3)
    # the other linears get the Mamba reference LM's init, not the GPT-2 one: PyTorch's kaiming-uniform
    # (std 1/sqrt(3 fan_in)), out_proj scaled by 1/sqrt(n_layer) (no MLPs: one residual per layer)
    n_layer, d_model, d_inner = model.config.n_layer, model.config.d_model, layers[0].d_inner
    for layer in layers:
        assert float(layer.in_proj.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * d_model), rel=0.05)
        assert float(layer.x_proj.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * d_inner), rel=0.05)
        assert float(layer.out_proj.weight.detach().abs().max()) <= 1 / math.sqrt(d_inner) / math.sqrt(n_layer)
        assert float(layer.out_proj.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * d_inner * n_layer), rel=0.05)
    # the embedding (tied head) keeps normal(0.02), as in the reference
    assert float(model.lm_head.weight.detach().std()) == pytest.approx(0.02, rel=0.05)


def test_hybrid_model_inits_each_mixer_its_own_way():
    # Mamba layers get their reference's init; attention and MLP linears the GPT-2 one (out projections
    # 1/sqrt(2 n_layer) with MLPs: two residual branches a layer), and Mamba's out_proj 1/sqrt(2 n_layer) too.
    torch.manual_seed(0)
    model = BasedForCausalLM.from_preset("based-tiny", layer_types=["mamba", "sliding_window"] * 2, vocab_size=257)
    n_layer = model.config.n_layer
    mamba = next(m for m in model.modules() if type(m).__name__ == "Mamba")
    assert float(mamba.in_proj.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * model.config.d_model), rel=0.1)
    assert float(mamba.out_proj.weight.detach().std()) == pytest.approx(1 / math.sqrt(3 * mamba.d_inner * 2 * n_layer), rel=0.1)
    block = model.transformer.layers[1]
    linears = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, linear in linears.items():
        expected = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("out_proj", "fc2")) else 0.02
        assert float(linear.weight.detach().std()) == pytest.approx(expected, rel=0.1), name
    with pytest.raises(ValueError, match="num_residual_layers"):
        mamba.reset_parameters_for_lm(0)
