"""oneDNN for the decoder's few-row products: the same results as ``nn.Linear`` (bit for bit
outside the routed rows), the decoder's linears and the output projection swapped with their
parameters kept, the vision tower and non-float32 models left alone, and a switch to turn it off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from streamer.config import ModelConfig
from streamer.inference.cpu_linear import ONEDNN_ROWS, FewRowLinear, onednn_linear_usable, route_few_row_linears
from streamer.inference.loader import load_model
from streamer.inference.transformers_engine import TransformersEngine

_WHY_NOT = onednn_linear_usable()
needs_onednn = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 37, 128, 129, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_products_are_nn_linears(rows: int, bias: bool) -> None:
    """Within ONEDNN_ROWS the products agree to float32 rounding; outside they are nn.Linear's bit for bit."""
    gen = torch.Generator().manual_seed(rows)
    plain = nn.Linear(192, 80, bias=bias)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(80, 192, generator=gen))
    routed = nn.Linear(192, 80, bias=bias)
    routed.load_state_dict(plain.state_dict())
    routed.__class__ = FewRowLinear
    for shape in ((rows, 192), (rows, 1, 192)):
        x = torch.randn(*shape, generator=gen)
        with torch.inference_mode():
            ours, theirs = routed(x), plain(x)
        assert ours.shape == theirs.shape
        if rows in ONEDNN_ROWS:
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4), (ours - theirs).abs().max()
        else:
            assert torch.equal(ours, theirs)
    # Autograd (never used in serving) stays with nn.Linear.
    x = torch.randn(8, 192, generator=gen, requires_grad=True)
    routed(x).sum().backward()
    assert x.grad is not None


@needs_onednn
def test_the_decoder_and_output_projection_are_routed_with_their_parameters(streamer_cache: Path) -> None:
    """The decoder's linears and the (tied) output projection become FewRowLinear; the vision
    tower's stay; parameters are the same tensors; a bfloat16 model is left alone."""
    model = load_model(ModelConfig(id="tiny-random")).model
    before = {name: p for name, p in model.named_parameters()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    routed = route_few_row_linears(model)
    decoder_linears = [m for m in model.get_decoder().modules() if isinstance(m, nn.Linear)]
    assert routed == len(decoder_linears) + 1 > 1
    assert all(type(m) is FewRowLinear for m in decoder_linears)
    assert type(model.get_output_embeddings()) is FewRowLinear
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert all(type(m) is not FewRowLinear for m in model.model.visual.modules())
    assert dict(model.named_parameters()) == before

    bf16 = load_model(ModelConfig(id="tiny-random")).model.to(torch.bfloat16)
    assert route_few_row_linears(bf16) == 0
    assert not any(type(m) is FewRowLinear for m in bf16.modules())


def test_the_switch_keeps_every_product_with_mkl(streamer_cache: Path) -> None:
    """model.onednn_few_rows false: the engine's model keeps nn.Linear everywhere."""
    cfg = ModelConfig(id="tiny-random", onednn_few_rows=False)
    engine = TransformersEngine(load_model(cfg), cfg)
    assert not any(type(m) is FewRowLinear for m in engine.loaded.model.modules())
