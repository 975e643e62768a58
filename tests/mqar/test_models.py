"""MQAR models: state accounting by the spec, causality, and the loss on labelled logits only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gradient_checks import assert_gradients_match_finite_differences

from linmix.mqar.data import IGNORE_INDEX, generate_mqar
from linmix.mqar.models import MIXERS, MQARModel, MQARModelConfig, masked_recall_loss, state_size_bytes
from linmix.ops.feature_maps import taylor_feature_dim

CONFIGS = [
    MQARModelConfig("attention", 16),
    MQARModelConfig("based", 16, feature_dim=4),
    MQARModelConfig("based_window", 16, feature_dim=4, window=4),
    MQARModelConfig("sliding_window", 16, window=4),
    MQARModelConfig("mamba", 16, d_state=4),
    MQARModelConfig("rwkv", 16),
    MQARModelConfig("rwkv5", 16, num_heads=2),
    MQARModelConfig("base_conv", 16),
]


def test_every_mixer_is_covered():
    assert sorted(c.mixer for c in CONFIGS) == sorted(MIXERS)


def test_state_bytes_match_the_spec_examples():
    # spec/BASED.md: "BASED d=64, f=16 -> ~40.5 KB; attention d=64 -> ~525 KB" at the longest test length 1024.
    short_conv = 64 * 3  # layer 0: d * k numbers
    assert state_size_bytes(MQARModelConfig("based", 64, feature_dim=16), 1024) == 4 * (64 * 153 + 153 + short_conv) == 40548
    assert state_size_bytes(MQARModelConfig("attention", 64), 1024) == 4 * (2 * 64 * 1024 + short_conv) == 525056


@pytest.mark.parametrize("d, f, w, n, length", [(48, 8, 16, 8, 512), (128, 24, 64, 24, 256)])
def test_state_bytes_formulas(d, f, w, n, length):
    conv = d * 3
    expanded = taylor_feature_dim(f)  # 1 + f + f (f + 1) / 2
    assert expanded == 1 + f + f * (f + 1) // 2
    assert state_size_bytes(MQARModelConfig("based", d, feature_dim=f), length) == 4 * (d * expanded + expanded + conv)
    assert state_size_bytes(MQARModelConfig("based_window", d, feature_dim=f, window=w), length) == 4 * (d * expanded + expanded + 2 * d * w + conv)
    assert state_size_bytes(MQARModelConfig("sliding_window", d, window=w), length) == 4 * (2 * d * w + conv)
    assert state_size_bytes(MQARModelConfig("mamba", d, d_state=n), length) == 4 * (2 * d * n + conv)
    assert state_size_bytes(MQARModelConfig("base_conv", d), length) == 4 * (d * length + conv)
    assert state_size_bytes(MQARModelConfig("attention", d), length) == 4 * (2 * d * length + conv)
    assert state_size_bytes(MQARModelConfig("rwkv", d), length) == 4 * (4 * d + conv)
    assert state_size_bytes(MQARModelConfig("rwkv5", d, num_heads=4), length) == 4 * (4 * (d // 4) ** 2 + conv)


def test_config_round_trips_and_names():
    config = MQARModelConfig("based_window", 64, feature_dim=8, window=16)
    assert MQARModelConfig.from_dict(config.to_dict()) == config
    assert config.name == "based_window_d64_f8_w16"
    assert MQARModelConfig("mamba", 64, d_state=8).name == "mamba_d64_n8"
    with pytest.raises(ValueError, match="mixer must be one of"):
        MQARModelConfig("transformer", 64)
    with pytest.raises(ValueError, match="window > 0"):
        MQARModelConfig("sliding_window", 64)
    with pytest.raises(ValueError, match="unknown MQARModelConfig fields"):
        MQARModelConfig.from_dict({"mixer": "based", "d_model": 8, "heads": 2})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_models_are_causal_and_train(config):
    torch.manual_seed(0)
    model = MQARModel(config, vocab_size=40, max_len=24)
    inputs, labels = generate_mqar(40, 24, 3, 2, seed=0)
    logits = model(inputs)
    assert logits.shape == (2, 24, 40)
    changed = inputs.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 40  # change the future
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :15], logits[:, :15].detach(), rtol=1e-5, atol=1e-5)
    loss, predictions, targets = masked_recall_loss(model, inputs, labels)
    # The loss is the cross-entropy of the full forward's logits at the labelled positions.
    asked = labels != IGNORE_INDEX
    torch.testing.assert_close(loss, F.cross_entropy(logits[asked], labels[asked]), rtol=1e-5, atol=1e-6)
    assert torch.equal(targets, labels[asked]) and torch.equal(predictions, logits[asked].argmax(-1))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.embedding.weight.grad.abs().sum() > 0
    # The model's gradients are the loss's derivatives: fp32 autograd against fp64 finite differences
    # (of the same cross-entropy taken in the model's dtype: masked_recall_loss rounds it to fp32).
    assert_gradients_match_finite_differences(
        model, lambda module: F.cross_entropy(module(inputs)[asked].double(), labels[asked]), what=config.name)


def test_head_is_tied_and_there_is_no_position_embedding():
    model = MQARModel(MQARModelConfig("based", 16, feature_dim=4), vocab_size=40, max_len=24)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings == [model.embedding]  # one embedding: tokens only
    hidden = torch.randn(3, 16)
    torch.testing.assert_close(model.logits(hidden), hidden @ model.embedding.weight.T)


def test_loss_is_cross_entropy_of_logits_at_labelled_positions_only():
    torch.manual_seed(0)
    model = MQARModel(MQARModelConfig("attention", 16), vocab_size=40, max_len=24)
    inputs, labels = generate_mqar(40, 24, 3, 4, seed=1)
    loss, predictions, targets = masked_recall_loss(model, inputs, labels)

    # the reference: full logits [B, T, V], cross-entropy with the unlabelled positions ignored
    logits = model(inputs)
    reference = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, reference)
    labelled = labels != IGNORE_INDEX
    assert torch.equal(targets, labels[labelled])
    assert torch.equal(predictions, logits[labelled].argmax(-1))
    # by hand: the mean over the 12 labelled positions of -log softmax(logits)[label]
    log_probs = torch.log_softmax(logits[labelled].double(), dim=-1)
    by_hand = -log_probs[torch.arange(int(labelled.sum())), labels[labelled]].mean()
    assert abs(float(loss.detach()) - float(by_hand.detach())) < 1e-5


def test_loss_ignores_unlabelled_positions():
    """Gradients reach the final hidden states only at labelled positions, and the loss does not
    change when the head would see something else at unlabelled ones."""
    torch.manual_seed(0)
    model = MQARModel(MQARModelConfig("based", 16, feature_dim=4), vocab_size=40, max_len=24)
    inputs, labels = generate_mqar(40, 24, 3, 2, seed=2)
    captured = {}

    def keep_grad(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    handle = model.final_norm.register_forward_hook(keep_grad)
    loss, _, _ = masked_recall_loss(model, inputs, labels)
    loss.backward()
    handle.remove()
    grad = captured["hidden"].grad  # [B, T, d]
    labelled = labels != IGNORE_INDEX
    assert grad[~labelled].abs().max() == 0
    assert (grad[labelled].abs().sum(-1) > 0).all()

    # a wildly different last token, which is never labelled, changes nothing (causal + masked)
    assert not labelled[:, -1].any()
    changed = inputs.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 40
    with torch.no_grad():
        torch.testing.assert_close(masked_recall_loss(model, changed, labels)[0], loss.detach())


def test_loss_rejects_mismatched_shapes():
    model = MQARModel(MQARModelConfig("attention", 16), vocab_size=40, max_len=24)
    with pytest.raises(ValueError, match="same shape"):
        masked_recall_loss(model, torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long))


def test_long_conv_rejects_too_long_sequences():
    model = MQARModel(MQARModelConfig("base_conv", 16), vocab_size=40, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 10, dtype=torch.long))
