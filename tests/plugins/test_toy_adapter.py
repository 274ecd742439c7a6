"""A toy adapter family added by this file alone, with the format its final/ is written in: (IA)3-style output
scaling, y = (1 + s) * base(x), one trainable s per output feature (toy_ia3.init its start). Its section, its
rule, its flags (no LoRA factors, no streamed layers), its memory (the planner builds it on the meta device),
trained, saved and loaded back by `slimtune eval`."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from slimtune import config as C
from slimtune.adapters.base import AdapterDefaults, AdapterFormat
from slimtune.adapters.inject import adapter_modules, replace_module
from slimtune.errors import ConfigError
from slimtune.formats.hf import verify_adapter_files
from slimtune.io import atomic_dir, dir_checksums, write_json
from slimtune.plan import plan_memory
from slimtune.registry import ADAPTER_FORMATS, ADAPTERS, SECTIONS
from slimtune.schema import option
from slimtune.trainer import run
from slimtune.trainer.evaluate import evaluate_model
from slimtune_testutil import TINY, losses


@dataclass(frozen=True)
class ToyIA3Config:
    init: float = option("start of every scale s (0: the base model unchanged)", 0.0)


ToyIA3Config.fixed_on_resume = True


class IA3Linear(nn.Module, AdapterDefaults):
    section, format = "toy_ia3", "toy_ia3"

    @classmethod
    def withholds(cls, cfg):
        return {"lora_factors", "plain_lora"}

    @classmethod
    def requires(cls, cfg):
        return {"whole_base_weight"}  # merging scales whole rows of the weight

    @classmethod
    def validate(cls, cfg):
        if cfg.toy_ia3.init <= -1:
            raise ConfigError(f"toy_ia3.init={cfg.toy_ia3.init} must be > -1 (1 + s scales the output)")

    def __init__(self, base: nn.Module, init: float):
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        self.scale = nn.Parameter(torch.full((base.out_features,), float(init), device=base.weight.device))

    @classmethod
    def from_config(cls, base, options, name=None, init="default"):
        return cls(base, options.init)

    def forward(self, x):
        return self.base(x) * (1 + self.scale).to(x.dtype)

    def trainable_parameters(self):
        return [self.scale]

    def delta_weight(self):
        return self.scale.detach().float()[:, None] * self.base.weight.detach().float()


def save_ia3(model, options, out_dir, model_name, base_path, quant=None):
    mods = adapter_modules(model)
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(
            {f"{n}.scale": m.scale.detach().float().contiguous() for n, m in mods.items()}, str(tmp / "ia3.safetensors")
        )
        write_json(
            tmp / "slimtune_adapter.json",
            {
                "format": "toy_ia3",
                "model_name": model_name,
                "base_model_name_or_path": base_path,
                "quant": quant,
                "checksums": dir_checksums(tmp),
            },
        )


def load_ia3(model, adapter_dir):
    verify_adapter_files(adapter_dir)
    state = load_file(str(Path(adapter_dir) / "ia3.safetensors"))
    names = [k.rsplit(".", 1)[0] for k in state]
    for name in names:
        m = replace_module(model, name, IA3Linear(model.get_submodule(name), 0.0))
        m.scale.data.copy_(state[f"{name}.scale"])
        m.scale.requires_grad_(False)
    return names


@pytest.fixture(autouse=True)
def toy(plug):
    plug(SECTIONS, "toy_ia3", ToyIA3Config)
    plug(ADAPTERS, "toy_ia3", IA3Linear)
    plug(ADAPTER_FORMATS, "toy_ia3", AdapterFormat(save=save_ia3, load=load_ia3))


def test_selectable_and_validated():
    assert C.load_config("lora", [*TINY, "adapter.type=toy_ia3", "toy_ia3.init=0.5"]).toy_ia3.init == 0.5
    with pytest.raises(ConfigError, match="toy_ia3.init=-2.0 must be > -1"):
        C.load_config("lora", [*TINY, "adapter.type=toy_ia3", "toy_ia3.init=-2"])
    with pytest.raises(
        ConfigError, match="optim.lora_plus_ratio=16.0 needs LoRA factors .*, which adapter.type=toy_ia3 does not give"
    ):
        C.load_config("lora", [*TINY, "adapter.type=toy_ia3", "optim.lora_plus_ratio=16"])


def test_planned_trainable_is_one_scale_per_output(tiny_model_dir):
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    per_layer = h + kv + kv + h + i + i + h  # q k v o gate up down: their out_features
    plan = plan_memory(C.load_config("lora", [*TINY, "adapter.type=toy_ia3"]), device="cpu")
    assert plan.details["trainable_params"] == config.num_hidden_layers * per_layer


def test_trains_saves_and_loads(tmp_path):
    out = tmp_path / "run"
    report = run(
        C.load_config(
            "lora", [*TINY, "adapter.type=toy_ia3", "train.max_steps=8", "train.lr=1e-2", f"output_dir={out}"]
        )
    )
    curve = losses(out)
    assert curve[-1] < curve[0]
    assert json.loads((out / "final" / "slimtune_adapter.json").read_text())["format"] == "toy_ia3"
    scored = evaluate_model(C.load_config(None, [*TINY, f"model.name={out / 'final'}"]))
    assert scored["eval_perplexity"] == pytest.approx(report["eval_perplexity"], rel=1e-5)
