"""Recipe loading, overrides and validation: every bad input is a ConfigError naming the key."""

import pytest

from slimtune import config as C
from slimtune.errors import ConfigError


def test_every_recipe_loads_and_has_contract_keys():
    assert {"lora", "qlora", "full"} <= set(C.list_recipes())
    keys = set(C.all_keys())
    contract = """model.name model.dtype data.source data.eval_fraction train.max_steps train.seq_len
    train.batch_size train.grad_accum train.lr train.warmup_steps train.seed train.activation_checkpointing
    adapter.type adapter.rank adapter.alpha adapter.dropout adapter.target_modules quant.method quant.backend
    optim.name checkpoint.every checkpoint.keep eval.every logging.wandb output_dir resume""".split()
    assert set(contract) <= keys
    for name in C.list_recipes():
        cfg = C.load_config(name)
        assert isinstance(cfg, C.RecipeConfig)


def test_overrides_are_typed():
    cfg = C.load_config("qlora", ["train.max_steps=7", "train.lr=3e-4", "adapter.target_modules=[q_proj,v_proj]",
                                  "train.activation_checkpointing=true", "adapter.alpha=8"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == 3e-4
    assert cfg.adapter.target_modules == ("q_proj", "v_proj")
    assert cfg.train.activation_checkpointing is True
    assert cfg.adapter.alpha == 8.0 and isinstance(cfg.adapter.alpha, float)
    with pytest.raises(Exception):
        cfg.train.max_steps = 3  # frozen


@pytest.mark.parametrize("override, needle", [
    ("train.max_stepz=3", "did you mean 'train.max_steps'"),
    ("adapter.rnak=3", "did you mean 'adapter.rank'"),
    ("adapter.rank=abc", "adapter.rank: expected int"),
    ("train.lr=fast", "train.lr: expected float"),
    ("adapter.rank=0", "adapter.rank=0 must be > 0"),
    ("train.seq_len=-5", "train.seq_len=-5 must be > 0"),
    ("quant.method=nf5", "quant.method='nf5' is not one of"),
    ("data.eval_fraction=1.5", "data.eval_fraction=1.5 must be in (0, 1)"),
    ("train.activation_checkpointing=maybe", "train.activation_checkpointing: expected bool"),
    ("adapter.target_modules=some", "adapter.target_modules='some'"),
    ("nonsense", "must look like key=value"),
    ("train.precision=fp4", "train.precision='fp4' is not one of"),
    ("train.halo_level=3", "train.halo_level=3 is not one of"),
    ("train.hadamard_block=48", "train.hadamard_block=48 must be a power of two"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        C.load_config("lora", [override])
    assert needle in str(e.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="quant.method=nf4 needs adapter.type=lora"):
        C.load_config("full", ["quant.method=nf4"])
    with pytest.raises(ConfigError, match="train.precision=fp8 runs .* set quant.method=none"):
        C.load_config("qlora", ["train.precision=fp8"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  max_steps: 3\n  batchsize: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        C.load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        C.load_config(str(tmp_path / "missing.yaml"))


def test_dump_roundtrip(tmp_path):
    cfg = C.load_config("qlora", ["adapter.rank=4"])
    p = tmp_path / "c.yaml"
    p.write_text(C.dump_yaml(cfg))
    assert C.load_config(str(p)) == cfg
    assert C.replace(cfg, **{"train.max_steps": 3}).train.max_steps == 3


@pytest.mark.parametrize("override, needle", [
    ("optim.betas=[0.9,abc]", "optim.betas[1]: expected float, got 'abc'"),
    ("lq_lora.bits=[2,x]", "lq_lora.bits[1]: expected int"),
    ("hooks=[nosuchhook]", "hooks='nosuchhook' is not one of"),
    ("train.kernels=cuda", "train.kernels='cuda' is not one of: auto, reference, triton"),
])
def test_element_types_and_new_keys(override, needle):
    with pytest.raises(ConfigError) as e:
        C.load_config("lora", [override])
    assert needle in str(e.value)


def test_choices_come_from_the_registries():
    """@register alone makes a name selectable and listed in the error message (no second list in config)."""
    from slimtune.registry import ADAPTERS, OPTIMIZERS, PRECISIONS, QUANT_FORMATS

    assert C.choices("optim.name") == tuple(OPTIMIZERS)
    assert C.choices("adapter.type") == ("none", *ADAPTERS)
    assert C.choices("quant.method") == ("none", "lq_lora", *QUANT_FORMATS)
    assert C.choices("train.precision") == ("default", *PRECISIONS)
    with pytest.raises(ConfigError, match="optim.name='my_sgd' is not one of"):
        C.load_config("lora", ["optim.name=my_sgd"])

    @OPTIMIZERS.register("my_sgd")
    def build(cfg, named, lr):  # pragma: no cover - only its registration matters here
        raise NotImplementedError

    try:
        assert C.load_config("lora", ["optim.name=my_sgd"]).optim.name == "my_sgd"
        with pytest.raises(ConfigError, match="optim.name='nope' is not one of: .*my_sgd"):
            C.load_config("lora", ["optim.name=nope"])
    finally:
        del OPTIMIZERS["my_sgd"]
    with pytest.raises(ValueError, match="registered twice"):
        OPTIMIZERS.register("adamw")(build)


def test_given_keys_are_what_the_user_set(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  max_steps: 3\ndata:\n  source: pydoc\n")
    assert C.given_keys(str(p), ["model.name=x"]) == {"train.max_steps", "data.source", "model.name"}
    assert C.given_keys(None, []) == set()


def test_string_keys_take_the_text_as_written():
    """YAML 1.1 reads off / yes / 2:4 as bool / bool / int; a string key must get the text."""
    cfg = C.load_config("lora", ["output_dir=off", "model.name=yes", "data.source=2:4"])
    assert (cfg.output_dir, cfg.model.name, cfg.data.source) == ("off", "yes", "2:4")
    assert C.load_config("lora", ["train.activation_checkpointing=yes"]).train.activation_checkpointing is True
