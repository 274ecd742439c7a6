"""A toy frozen quantized format added by this file alone: symmetric INT-k with one fp32 scale per output row
(toy_rowint.bits), the codes kept as int8. Its section and rule, its flags (a frozen base: full fine-tuning
refused), its storage for the planner (its tensor layout), quantizing a base (dequantized weights equal a
reference rounding), LoRA on it trained, and `slimtune quantize`'s checkpoint loaded back."""

from dataclasses import dataclass

import pytest
import torch

from slimtune import config as C
from slimtune.errors import ConfigError
from slimtune.formats.hf import load_model
from slimtune.model.quantize import quantize_command
from slimtune.plan import plan_memory
from slimtune.quant.linear import FrozenQuantLinear, LinearDequant
from slimtune.registry import QUANT_FORMATS, SECTIONS
from slimtune.schema import option
from slimtune.trainer import run
from slimtune.trainer.evaluate import evaluate_model
from slimtune_testutil import TINY, losses


@dataclass(frozen=True)
class ToyRowIntConfig:
    bits: int = option("bits per weight (2..8)", 6)


ToyRowIntConfig.fixed_on_resume = True


@dataclass(frozen=True)
class RowIntFormat:
    bits: int
    exact_zero = True  # symmetric: 0 is a level

    @property
    def name(self) -> str:
        return f"toy_rowint{self.bits}"

    def tensor_layout(self, shape):
        return {"codes": (shape[0] * shape[1], torch.int8), "scale": (shape[0], torch.float32)}


@dataclass
class RowIntWeight:
    codes: torch.Tensor
    scale: torch.Tensor
    shape: tuple

    def dequantize(self, dtype=torch.float32):
        return (self.codes.view(self.shape).float() * self.scale[:, None]).to(dtype)

    def tensors(self):
        return {"codes": self.codes, "scale": self.scale}

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def reference_rowint(w: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / levels
    return (w / scale).round().clamp(-levels, levels) * scale


class RowIntLinear(FrozenQuantLinear):
    format, section, _function = "toy_rowint", "toy_rowint", LinearDequant
    bnb_methods = ()

    @classmethod
    def validate(cls, cfg):
        if not 2 <= cfg.toy_rowint.bits <= 8:
            raise ConfigError(f"toy_rowint.bits={cfg.toy_rowint.bits} must be in [2, 8]")

    @classmethod
    def requires(cls, cfg):
        return set()

    @classmethod
    def format_for(cls, name, block_size=None, double_quant=None, options=None):
        return RowIntFormat(options.bits if options is not None else int(name.removeprefix("toy_rowint") or 6))

    @classmethod
    def make(cls, fmt, in_features, out_features, bias=False, compute_dtype=None, device=None):
        m = cls()
        m.fmt = fmt
        m._init_common(in_features, out_features, bias, 0, compute_dtype, device)
        return m

    def _quantize(self, w):
        levels = 2 ** (self.fmt.bits - 1) - 1
        w = w.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / levels
        codes = (w / scale[:, None]).round().clamp(-levels, levels).to(torch.int8)
        return RowIntWeight(codes.flatten(), scale, (self.out_features, self.in_features))

    def _empty(self, device):
        return RowIntWeight(
            torch.zeros(self.out_features * self.in_features, dtype=torch.int8, device=device),
            torch.zeros(self.out_features, device=device),
            (self.out_features, self.in_features),
        )

    def _packed(self):
        return RowIntWeight(self.codes, self.scale, (self.out_features, self.in_features))


@pytest.fixture(autouse=True)
def toy(plug, monkeypatch):
    plug(SECTIONS, "toy_rowint", ToyRowIntConfig)
    plug(QUANT_FORMATS, "toy_rowint", RowIntLinear)


def test_selectable_and_validated():
    assert C.load_config("qlora", [*TINY, "quant.method=toy_rowint"]).quant.method == "toy_rowint"
    with pytest.raises(ConfigError, match=r"toy_rowint.bits=9 must be in \[2, 8\]"):
        C.load_config("qlora", [*TINY, "quant.method=toy_rowint", "toy_rowint.bits=9"])
    with pytest.raises(
        ConfigError,
        match="adapter.type=none needs a base whose weights can be trained, which "
        "quant.method=toy_rowint does not give",
    ):
        C.load_config("full", [*TINY, "quant.method=toy_rowint"])


def test_planned_storage_is_its_layout(tiny_model_dir):
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    plain = plan_memory(C.load_config("lora", TINY), device="cpu")
    quantized = plan_memory(C.load_config("lora", [*TINY, "quant.method=toy_rowint"]), device="cpu")
    model = load_model("tiny-llama", "float32")
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    saved = sum(4 * m.weight.numel() - (m.weight.numel() + 4 * m.out_features) for m in linears)
    assert plain.phases["eval"] - quantized.phases["eval"] == saved
    assert config.num_hidden_layers * 7 == len(linears)


def test_quantized_base_trains_and_its_checkpoint_loads(tmp_path):
    model = load_model("tiny-llama", "float32")
    w = model.model.layers[0].mlp.down_proj.weight.detach().bfloat16().float()  # a quantized base loads in bf16
    out = quantize_command(
        C.load_config(None, [*TINY, "quant.method=toy_rowint", "toy_rowint.bits=4", f"output_dir={tmp_path / 'q'}"])
    )
    from slimtune.model.load import load_base

    loaded = load_base(str(out)).model.layers[0].mlp.down_proj
    assert isinstance(loaded, RowIntLinear)
    torch.testing.assert_close(loaded.dequantize_weight(), reference_rowint(w, 4))
    report = run(
        C.load_config(
            "qlora",
            [
                *TINY,
                "quant.method=toy_rowint",
                "toy_rowint.bits=3",
                "train.max_steps=6",
                "train.lr=1e-2",
                f"output_dir={tmp_path / 'run'}",
            ],
        )
    )
    assert len(losses(tmp_path / "run")) == 6 and report["eval_perplexity"] < report["eval_perplexity_before"]
    scored = evaluate_model(C.load_config(None, [*TINY, f"model.name={tmp_path / 'run' / 'final'}"]))
    assert scored["eval_perplexity"] == pytest.approx(report["eval_perplexity"], rel=1e-5)
