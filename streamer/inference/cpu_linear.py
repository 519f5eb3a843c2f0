"""oneDNN for the decoder's few-row products on CPU: :func:`route_few_row_linears`.

A batch decode step multiplies a handful of rows (one per question) by every decoder weight.
For 4 to a few dozen rows MKL's float32 GEMM, which ``torch.nn.functional.linear`` calls on
CPU, reads the ``out x in`` weight far slower than for one row: the products of a decode step
of 8 questions on the benchmark's model took 2.4 times one question's, where the weights'
memory traffic is the same. oneDNN's inner-product primitive (torch's own, the one its CPU
compiler emits for frozen linears) reads the same float32 weight, in place, at close to the
one-row cost.
Measured on this project's 2-core CPU, the 7 decoder layers of the benchmark's model
(float32, ms per pass over every layer's linears, medians of 3 interleaved runs):

====  =====  ======
rows   MKL   oneDNN
====  =====  ======
   1   48      51
   2   51      73
   4   97      69
   8  132      81
  37  179     157
 128  460     401
 192  571     595
====  =====  ======

and the 151936-row output projection at 8 rows: 113 ms (MKL) against 53 ms (oneDNN). So rows
in :data:`ONEDNN_ROWS` go to oneDNN and the rest (single questions, prefills) stay with MKL.
Both accumulate in float32; the results differ by summation order only (~1e-6 relative, the
same order as a batched product against a one-row one), and the fast path's tests compare
logits and token ids against ``generate``. The vision tower is left alone (its products
have a thousand rows or more).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: Rows (the product of the input's leading dimensions) that oneDNN multiplies faster than
#: MKL on CPU (measured: see the module's docstring).
ONEDNN_ROWS = range(4, 129)


class FewRowLinear(nn.Linear):
    """An ``nn.Linear`` (the same parameters) that multiplies inputs of :data:`ONEDNN_ROWS`
    rows with oneDNN and any other input as ``nn.Linear`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] and x.numel() // x.shape[-1] in ONEDNN_ROWS and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def onednn_linear_usable() -> str | None:
    """None when oneDNN's linear runs here and agrees with ``F.linear``; else why not."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)"
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((8, 96), (40, 96), (40,)))
    try:
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except RuntimeError as err:  # the op exists but this build cannot run it
        return f"oneDNN's linear failed: {err}"
    if not torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5):
        return "oneDNN's linear disagrees with torch.nn.functional.linear"
    return None


def route_few_row_linears(model: Any) -> int:
    """Make the decoder's linears and the output projection of ``model`` (on CPU, float32)
    :class:`FewRowLinear`; returns how many. Parameters are shared, not copied (tied
    embeddings stay tied); the model's memory is unchanged. Nothing changes (0) where
    :func:`onednn_linear_usable` says no, or the model is not float32 on CPU."""
    head = model.get_output_embeddings()
    if head is None or head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return 0
    why = onednn_linear_usable()
    if why is not None:
        log.info("few-row products stay with MKL: %s", why)
        return 0
    targets = [m for m in (*model.get_decoder().modules(), head) if type(m) is nn.Linear and m.weight.is_contiguous()]
    for module in targets:
        module.__class__ = FewRowLinear  # same parameters and state; only forward differs
    return len(targets)
