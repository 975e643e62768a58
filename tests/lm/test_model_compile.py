"""torch.compile of BasedForCausalLM: the whole forward is one graph (no breaks from input checks or
backend dispatch), and the compiled model computes what the eager one does."""

import pytest
import torch

from linmix.lm import BasedForCausalLM, preset


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model_and_inputs():
    torch.manual_seed(0)
    model = BasedForCausalLM(preset("based-tiny")).eval()  # base conv, linear attention, sliding window, MLPs
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[0, :6] = False  # left padding
    return model, ids, mask


def _graphs(call):
    explanation = torch._dynamo.explain(call)()
    return explanation.graph_count, explanation.graph_break_count, [b.reason for b in explanation.break_reasons]


def test_forward_is_one_graph_without_breaks():
    model, ids, mask = _model_and_inputs()
    count, breaks, reasons = _graphs(lambda: model(ids, attention_mask=mask, labels=ids))
    assert (count, breaks) == (1, 0), reasons


@pytest.mark.slow
def test_forward_variants_are_one_graph_without_breaks():
    model, ids, _ = _model_and_inputs()
    for call in (lambda: model(ids), lambda: model(ids, return_state=True), lambda: model(ids, logits_to_keep=1)):
        count, breaks, reasons = _graphs(call)
        assert (count, breaks) == (1, 0), reasons
        torch._dynamo.reset()


def test_compiled_forward_equals_eager():
    model, ids, mask = _model_and_inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for kwargs in ({"attention_mask": mask, "labels": ids},):
            eager_out, compiled_out = model(ids, **kwargs), compiled(ids, **kwargs)
            torch.testing.assert_close(compiled_out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
            if "labels" in kwargs:
                torch.testing.assert_close(compiled_out.loss, eager_out.loss, rtol=1e-5, atol=1e-6)


def test_eager_still_checks_the_id_range():
    model, ids, _ = _model_and_inputs()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size = 256\)"):
        model(ids + 256)


@pytest.mark.slow
def test_inductor_compiled_forward_and_backward_equal_eager():
    model, ids, mask = _model_and_inputs()
    model.train()
    compiled = torch.compile(model, fullgraph=True)
    eager_loss = model(ids, attention_mask=mask, labels=ids).loss
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = compiled(ids, attention_mask=mask, labels=ids).loss
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)
