"""A new quantized format is one class plus one registration: quantize_model, the quantized checkpoint
(save -> load) and the adapters' dispatch all take it with no other change."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from slimtune.formats.quantized import load_quantized, save_quantized
from slimtune.formats.hf import load_model, load_tokenizer
from slimtune.quant import FrozenQuantLinear, dequantize_weight, is_quantized_linear, quantize_model
from slimtune.quant.linear import LinearDequant
from slimtune.registry import QUANT_FORMATS


@dataclass(frozen=True)
class Half:
    name: str = "half"


@dataclass
class HalfWeight:
    codes: torch.Tensor  # fp16 (out, in)
    shape: tuple

    def dequantize(self, dtype=torch.float32):
        return self.codes.to(dtype)

    def tensors(self):
        return {"codes": self.codes}

    @property
    def nbytes(self):
        return self.codes.numel() * 2


class HalfLinear(FrozenQuantLinear):
    """A toy format: the weight stored in fp16 (16 bits/param)."""

    format = "half"
    _function = LinearDequant

    def __init__(self, in_features, out_features, bias=False, compute_dtype=None, device=None):
        super().__init__()
        self.fmt = Half()
        self._init_common(in_features, out_features, bias, 1, compute_dtype, device)

    @classmethod
    def format_for(cls, name, block_size=None, double_quant=None):
        return Half()

    @classmethod
    def make(cls, fmt, in_features, out_features, bias=False, compute_dtype=None, device=None):
        return cls(in_features, out_features, bias, compute_dtype, device)

    def _quantize(self, w):
        return HalfWeight(w.detach().to(torch.float16), tuple(w.shape))

    def _empty(self, device):
        return HalfWeight(
            torch.zeros(self.out_features, self.in_features, dtype=torch.float16, device=device),
            (self.out_features, self.in_features),
        )

    def _packed(self):
        return HalfWeight(self.codes, (self.out_features, self.in_features))


@pytest.fixture
def half_format():
    QUANT_FORMATS.register("half")(HalfLinear)
    yield
    del QUANT_FORMATS["half"]


def test_a_registered_format_quantizes_saves_and_loads(half_format, tmp_path):
    from slimtune.config import load_config

    assert load_config("qlora", ["quant.method=half"]).quant.method == "half"  # selectable by registering
    model = load_model("tiny-llama")
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    assert quantize_model(model, "half") == 14
    q = {n: m for n, m in model.named_modules() if isinstance(m, HalfLinear)}
    assert len(q) == 14 and all(is_quantized_linear(m) for m in q.values())
    for n, m in q.items():
        assert torch.equal(dequantize_weight(m), dense[n].half().float())
    save_quantized(model, tmp_path / "ckpt", load_tokenizer("tiny-llama"), {"method": "half"})
    back = load_quantized(tmp_path / "ckpt").eval()
    x = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, model.eval()(input_ids=x).logits, rtol=0, atol=0)


def test_a_manifest_naming_an_unregistered_class_is_one_clear_error(half_format, tmp_path):
    import json

    from slimtune.errors import SlimtuneError

    model = load_model("tiny-llama")
    quantize_model(model, "half")
    save_quantized(model, tmp_path / "ckpt", None, {"method": "half"})
    manifest = json.loads((tmp_path / "ckpt" / "slimtune_quant.json").read_text())
    next(iter(manifest["quantized"].values()))["class"] = "Mystery"
    (tmp_path / "ckpt" / "slimtune_quant.json").write_text(json.dumps(manifest))
    with pytest.raises(SlimtuneError, match="class 'Mystery' is not a registered quantized format"):
        load_quantized(tmp_path / "ckpt")
