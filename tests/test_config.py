"""Recipe loading, overrides and validation: every bad input is a ConfigError naming the key."""

import pytest

from slimtune import config as C
from slimtune.errors import ConfigError


def test_every_recipe_loads_and_has_contract_keys():
    assert {"lora", "qlora", "full"} <= set(C.list_recipes())
    keys = set(C.all_keys())
    contract = """model.name model.dtype data.source data.eval_fraction train.max_steps train.seq_len
    train.batch_size train.grad_accum train.lr train.warmup_steps train.seed train.activation_checkpointing
    adapter.type lora.rank lora.alpha lora.dropout adapter.target_modules quant.method quant.backend
    optim.name checkpoint.every checkpoint.keep eval.every logging.wandb output_dir resume""".split()
    assert set(contract) <= keys
    for name in C.list_recipes():
        cfg = C.load_config(name)
        assert isinstance(cfg, C.RecipeConfig)


def test_overrides_are_typed():
    cfg = C.load_config(
        "qlora",
        [
            "train.max_steps=7",
            "train.lr=3e-4",
            "adapter.target_modules=[q_proj,v_proj]",
            "train.activation_checkpointing=true",
            "lora.alpha=8",
        ],
    )
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == 3e-4
    assert cfg.adapter.target_modules == ("q_proj", "v_proj")
    assert cfg.train.activation_checkpointing is True
    assert cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float)
    with pytest.raises(Exception):
        cfg.train.max_steps = 3  # frozen


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_stepz=3", "did you mean 'train.max_steps'"),
        ("adapter.rnak=3", "did you mean 'lora.rank'"),
        ("lora.rank=abc", "lora.rank: expected int"),
        ("train.lr=fast", "train.lr: expected float"),
        ("lora.rank=0", "lora.rank=0 must be > 0"),
        ("train.seq_len=-5", "train.seq_len=-5 must be > 0"),
        ("quant.method=nf5", "quant.method='nf5' is not one of"),
        ("data.eval_fraction=1.5", "data.eval_fraction=1.5 must be in (0, 1)"),
        ("train.activation_checkpointing=maybe", "train.activation_checkpointing: expected bool"),
        ("adapter.target_modules=some", "adapter.target_modules='some'"),
        ("nonsense", "must look like key=value"),
        ("train.precision=fp4", "train.precision='fp4' is not one of"),
        ("halo.level=3", "halo.level=3 is not one of"),
        ("train.precision=halo halo.hadamard_block=48", "halo.hadamard_block=48 must be a power of two"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        C.load_config("lora", override.split())
    assert needle in str(e.value)


def test_cross_field_rules():
    with pytest.raises(
        ConfigError,
        match="adapter.type=none needs a base whose weights can be trained, which "
        "quant.method=nf4 does not give: change one of adapter.type and "
        "quant.method",
    ):
        C.load_config("full", ["quant.method=nf4"])
    with pytest.raises(
        ConfigError,
        match="train.precision=fp8 needs full-precision linear layers in the base, which "
        "quant.method=nf4 does not give",
    ):
        C.load_config("qlora", ["train.precision=fp8"])


def test_old_keys_work_with_one_notice_line(capsys, tmp_path):
    """Keys renamed when each technique got its own section keep working for one release: every renamed key
    of the run in one stderr line, and the config equals the one written with the new keys."""
    old = C.load_config(
        "galore",
        ["adapter.rank=8", "optim.rank=32", "optim.proj_type=left", "train.halo_level=1", "offload.optimizer=disk"],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimtune: renamed keys")
    for pair in (
        "adapter.rank -> lora.rank",
        "optim.rank -> galore.rank",
        "optim.proj_type -> galore.proj_type",
        "train.halo_level -> halo.level",
        "offload.optimizer -> engine.optimizer",
    ):
        assert pair in err[0]
    new = C.load_config(
        "galore",
        [
            "lora.rank=8",
            "galore.rank=32",
            "galore.proj_type=left",
            "halo.level=1",
            "engine.name=offload",
            "engine.params=none",
            "engine.optimizer=disk",
        ],
    )
    assert capsys.readouterr().err == ""  # new keys: no notice
    assert old == new
    # an old key the chosen optimizer has no use for is dropped, and said so
    C.load_config("lora", ["optim.rank=8"])
    assert "optim.rank -> galore.rank/dct.rank (unused with optim.name=adamw)" in capsys.readouterr().err
    p = tmp_path / "old.yaml"
    p.write_text("adapter:\n  type: lora\n  rank: 4\nengine:\n  name: deepspeed\n  zero_stage: 3\n  offload: nvme\n")
    cfg = C.load_config(str(p))
    assert (cfg.lora.rank, cfg.deepspeed.zero_stage, cfg.engine.optimizer, cfg.engine.params) == (4, 3, "disk", "disk")


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  max_steps: 3\n  batchsize: 2\n")
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        C.load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        C.load_config(str(tmp_path / "missing.yaml"))


def test_dump_roundtrip(tmp_path):
    cfg = C.load_config("qlora", ["lora.rank=4"])
    p = tmp_path / "c.yaml"
    p.write_text(C.dump_yaml(cfg))
    assert C.load_config(str(p)) == cfg
    assert C.replace(cfg, **{"train.max_steps": 3}).train.max_steps == 3


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.betas=[0.9,abc]", "optim.betas[1]: expected float, got 'abc'"),
        ("lq_lora.bits=[2,x]", "lq_lora.bits[1]: expected int"),
        ("hooks=[nosuchhook]", "hooks='nosuchhook' is not one of"),
        ("train.kernels=cuda", "train.kernels='cuda' is not one of: auto, reference, triton"),
    ],
)
def test_element_types_and_new_keys(override, needle):
    with pytest.raises(ConfigError) as e:
        C.load_config("lora", override.split())
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
