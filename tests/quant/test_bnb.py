"""The bitsandbytes backend and quantize_model on a tiny Llama."""

import pytest
import torch
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes")

from slimtune.quant import dequantize_weight, is_quantized_linear, quantize_model  # noqa: E402
from slimtune.quant.bnb import to_bnb_linear  # noqa: E402


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bnb_linear_forward_backward(method):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    m = to_bnb_linear(lin, method)
    assert is_quantized_linear(m)
    w = dequantize_weight(m)
    assert (w - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()
    x = torch.randn(4, 128, requires_grad=True)
    y = m(x).float()
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), rtol=2e-2, atol=2e-2)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend, method", [("slimtune", "nf4"), ("slimtune", "int8"),
                                             ("bitsandbytes", "nf4"), ("bitsandbytes", "int8")])
def test_quantize_model_keeps_lm_head_and_logits_close(backend, method):
    from slimtune.models import load_model

    ref = load_model("tiny-llama").eval()
    q = load_model("tiny-llama").eval()
    n = quantize_model(q, method, backend=backend)
    assert n == 2 * 7  # q k v o gate up down per layer, not lm_head
    assert type(q.lm_head) is torch.nn.Linear
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        a, b = ref(input_ids=x).logits, q(input_ids=x).logits.float()
    # 4 bits on random N(0, 0.02) weights: ~10% weight error; 8 bits: <1%
    assert ((a - b).norm() / a.norm()) < (0.25 if method == "nf4" else 0.03)
    with pytest.raises(ValueError, match="valid"):
        quantize_model(load_model("tiny-llama"), "nf3")


def test_slimtune_nf4_model_equals_bitsandbytes_nf4_model():
    """Same codes, same scales: slimtune's NF4 model gives bnb's logits (double quant off)."""
    from slimtune.models import load_model

    ours, theirs = load_model("tiny-llama").eval(), load_model("tiny-llama").eval()
    quantize_model(ours, "nf4", backend="slimtune", double_quant=False)
    quantize_model(theirs, "nf4", backend="bitsandbytes", double_quant=False)
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits.float(), rtol=1e-4, atol=1e-4)
