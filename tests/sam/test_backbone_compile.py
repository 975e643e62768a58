"""torch.compile of the RWKV-SAM image encoder: one graph without breaks (the native C kernels, the
oneDNN fused conv and every backend choice stay out of the traced region), and compiled outputs
equal the eager ones, which run those kernels.

The fast tests use a "micro" variant registered for the test (every module type of the encoder,
fewer and narrower blocks) so that tracing stays quick; the shipped "tiny" variant is checked in a
slow test."""

import pytest
import torch

from linmix.sam.backbone import BACKBONE_VARIANTS, BackboneVariant, RwkvSamBackbone, RwkvSamImageEncoder

MICRO = BackboneVariant(8, 8, 16, 32, token_depth=2, stage1_depth=2, stage2_depth=2)


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.setitem(BACKBONE_VARIANTS, "micro", MICRO)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs(module, *args):
    explanation = torch._dynamo.explain(module)(*args)
    return explanation.graph_count, explanation.graph_break_count, [b.reason for b in explanation.break_reasons]


@pytest.mark.parametrize("token_mixer", ["rwkv", pytest.param("attention", marks=pytest.mark.slow)])
def test_encoder_inference_is_one_graph(token_mixer):
    torch.manual_seed(0)
    encoder = RwkvSamImageEncoder("micro", token_mixer).eval()
    with torch.no_grad():
        count, breaks, reasons = _graphs(encoder, torch.randn(1, 3, 48, 80))
    assert (count, breaks) == (1, 0), reasons


@pytest.mark.slow
def test_backbone_training_forward_is_one_graph():
    torch.manual_seed(0)
    backbone = RwkvSamBackbone("micro", drop_path_rate=0.1).train()
    count, breaks, reasons = _graphs(backbone, torch.randn(1, 3, 32, 48))
    assert (count, breaks) == (1, 0), reasons


def test_compiled_encoder_equals_eager():
    """Eager fp32 inference runs the native Bi-WKV / Q-shift kernels and the fused conv + GELU; the
    compiled graph runs their torch forms. Same values to fp32 rounding."""
    torch.manual_seed(0)
    encoder = RwkvSamImageEncoder("micro").eval()
    image = torch.randn(2, 3, 48, 80)
    compiled = torch.compile(encoder, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager_out, compiled_out = encoder(image), compiled(image)
    for name, got, expected in zip(eager_out._fields, compiled_out, eager_out):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_tiny_encoder_is_one_graph():
    torch.manual_seed(0)
    encoder = RwkvSamImageEncoder("tiny").eval()
    with torch.no_grad():
        count, breaks, reasons = _graphs(encoder, torch.randn(1, 3, 64, 64))
    assert (count, breaks) == (1, 0), reasons


@pytest.mark.slow
def test_inductor_compiled_encoder_equals_eager():
    torch.manual_seed(0)
    encoder = RwkvSamImageEncoder("micro").eval()
    image = torch.randn(1, 3, 48, 64)
    compiled = torch.compile(encoder, fullgraph=True)
    with torch.no_grad():
        eager_out, compiled_out = encoder(image), compiled(image)
    for got, expected in zip(compiled_out, eager_out):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
