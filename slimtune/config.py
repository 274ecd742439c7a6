"""Recipe configuration: YAML + dotted `key=value` overrides -> a frozen, validated dataclass tree.

Defaults live only in the dataclasses below. Every key is checked (unknown keys get the nearest valid
one suggested), every value is type-checked, and cross-field rules run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slimtune.errors import ConfigError
from slimtune.registry import BY_KEY

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _help(text: str, default, choices: tuple | None = None, **kw):
    """A field with its help text; `choices` for a fixed set of values (keys that pick a plugin take theirs
    from the plugin registry instead: registry.BY_KEY)."""
    meta = {"help": text} if choices is None else {"help": text, "choices": tuple(choices)}
    return field(default=default, metadata=meta, **kw)


KERNEL_BACKENDS = ("auto", "reference", "triton")  # train.kernels (kernels/dispatch.py reads it from here)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _help("local HF causal-LM dir, or smollm2-135m | tiny-llama", "smollm2-135m")
    dtype: str = _help("float32 | bfloat16: storage of frozen weights and autocast compute dtype", "float32",
                       ("float32", "bfloat16"))


@dataclass(frozen=True)
class DataConfig:
    source: str = _help("pydoc | path to .txt | path to .jsonl (text or prompt/response)", "pydoc")
    eval_fraction: float = _help("fraction of packed blocks held out for eval (deterministic)", 0.05)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = _help("optimizer steps", 100)
    seq_len: int = _help("tokens per packed block", 256)
    batch_size: int = _help("blocks per micro-batch per process", 4)
    grad_accum: int = _help("micro-batches per optimizer step", 1)
    lr: float = _help("peak learning rate", 2e-4)
    warmup_steps: int = _help("linear warmup steps, then cosine decay", 10)
    min_lr_ratio: float = _help("cosine floor as a fraction of lr", 0.1)
    max_grad_norm: float = _help("gradient clipping (0 disables)", 1.0)
    seed: int = _help("seed for init, dropout and data order", 0)
    activation_checkpointing: bool = _help("recompute activations in backward: less memory, ~30% slower", False)
    loss_chunk_tokens: int = _help("tokens per cross-entropy chunk (chunk x vocab fp32 live); 0 = naive", 256)
    device: str = _help("auto | cpu | cuda", "auto", ("auto", "cpu", "cuda"))
    kernels: str = _help("auto (Triton kernels on CUDA when triton is installed) | reference (torch only) | triton "
                         "(always; CPU tensors need TRITON_INTERPRET=1). The SLIMTUNE_KERNELS environment "
                         "variable overrides it", "auto", KERNEL_BACKENDS)
    precision: str = _help("matmuls of the linear layers (lm_head excluded): default (model.dtype) | fp8 (e4m3 "
                           "forward, e5m2 gradients) | halo (fp8 + Hadamard rotations) | mxfp4 (Quartet QAT)",
                           "default")
    halo_level: int = _help("train.precision=halo: 0 no rotation | 1 forward | 2 forward + input gradient", 2,
                            (0, 1, 2))
    hadamard_block: int = _help("train.precision=halo: Hadamard block (power of two <= 256; reduced to what "
                                "divides each dim)", 128)


@dataclass(frozen=True)
class AdapterConfig:
    type: str = _help("lora | lq_lora (needs quant.method=lq_lora) | none (full fine-tuning)", "lora")
    rank: int = _help("LoRA rank r", 16)
    alpha: float = _help("LoRA scaling numerator: delta = alpha/r * B A", 32.0)
    dropout: float = _help("dropout on the LoRA input", 0.0)
    target_modules: typing.Union[str, tuple[str, ...]] = _help("module names (suffix match) or all-linear",
                                                               "all-linear")
    init: str = _help("default (B=0) | loftq (alternate quantize/SVD) | eora (activation-weighted SVD of the "
                      "quantization error); loftq/eora need a slimtune quant.method", "default")


@dataclass(frozen=True)
class QuantConfig:
    method: str = _help("none | nf4 | int8 | nf2 | nf3 | int2..int7 | int2a..int8a (asymmetric) | "
                        "lq_lora (per-matrix formats under lq_lora.budget_bits)", "none")
    backend: str = _help("slimtune | bitsandbytes", "slimtune", ("slimtune", "bitsandbytes"))
    block_size: int = _help("weights per absmax block", 64)
    double_quant: bool = _help("quantize the NF4 block scales to 8 bits (saves ~0.4 bit/param)", True)


@dataclass(frozen=True)
class LQLoRAConfig:
    budget_bits: float = _help("average bits/param of the quantized base (codes + scales)", 3.0)
    fisher: bool = _help("weight the decomposition and the allocation by the diagonal Fisher", True)
    calibration_samples: int = _help("train blocks for the Fisher / EoRA activation statistics", 16)
    max_iters: int = _help("alternations of quantize / low-rank (LQ-LoRA, LoftQ) for the final decomposition", 10)
    score_iters: int = _help("alternations when scoring every candidate format for the bit allocation", 2)
    bits: tuple[int, ...] = _help("NormalFloat bit widths the allocation may choose", (2, 3, 4))
    block_sizes: tuple[int, ...] = _help("block sizes the allocation may choose", (64, 128, 256))


@dataclass(frozen=True)
class OptimConfig:
    name: str = _help("adamw | adamw8bit (bitsandbytes) | sgd | galore | frugal | dct", "adamw")
    weight_decay: float = _help("decoupled weight decay", 0.0)
    betas: tuple[float, ...] = _help("Adam betas", (0.9, 0.999))
    eps: float = _help("Adam epsilon", 1e-8)
    momentum: float = _help("SGD momentum", 0.0)
    rank: int = _help("galore / dct: rank of the gradient projection (clamped to min(m, n))", 128)
    update_gap: int = _help("galore / dct / frugal: steps between projection (subspace) updates", 200)
    scale: float = _help("galore / dct: scale of the back-projected update", 0.25)
    proj_type: str = _help("galore / dct: std (smaller side) | left | right", "std", ("std", "left", "right"))
    density: float = _help("frugal: fraction of each matrix updated state-full (AdamW)", 0.25)
    subspace: str = _help("frugal: svd | random | blocks (rows/columns) | coordinates | modules (whole params)",
                          "svd", ("svd", "random", "blocks", "coordinates", "modules"))
    inactive_lr_scale: float = _help("frugal: lr multiplier of the state-free signSGD part", 1.0)
    state_bits: int = _help("32 | 8: block-wise 8-bit Adam moments (adamw, galore, frugal, dct)", 32, (32, 8))
    proj_dtype: str = _help("galore / frugal (svd, random): storage of the projection P, float32 | bfloat16 | int8",
                            "float32", ("float32", "bfloat16", "int8"))
    in_backward: bool = _help("step each parameter in backward and free its gradient (grad_accum 1, no clipping)",
                              False)
    full_rank_modules: tuple[str, ...] = _help("galore / dct / frugal: modules (name suffix) kept on plain AdamW",
                                     ("embed_tokens", "lm_head"))
    seed: int = _help("frugal: seed of the random subspaces (the same on every rank)", 0)


@dataclass(frozen=True)
class OffloadConfig:
    params: str = _help("where the model's weights live between uses: none (RAM) | cpu (pinned host memory, the GPU "
                        "case; none on a CPU-only machine) | disk (streamed layer by layer from offload.dir)", "none",
                        ("none", "cpu", "disk"))
    optimizer: str = _help("where the optimizer state (and fp32 master weights) live: none | cpu | disk", "none",
                           ("none", "cpu", "disk"))
    dir: str = _help("the store's directory (default: offload/ inside output_dir); a fast local disk", "")
    prefetch: int = _help("units (decoder layers) read ahead of the one computing", 2)
    io_threads: int = _help("threads doing the store's reads and writes", 4)
    direct_io: bool = _help("O_DIRECT reads/writes (bypass the page cache) where the file system allows", True)
    activations: str = _help("backward: keep each layer's activations in RAM (weights loaded again when backward "
                             "reads them) | recompute each layer from its input | auto (keep when they fit in 1/8 "
                             "of RAM and the streamed weights are plain)", "auto", ("auto", "keep", "recompute"))


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _help("save every N steps (0 = only at the end)", 0)
    keep: int = _help("how many step checkpoints to keep", 2)


@dataclass(frozen=True)
class EvalConfig:
    every: int = _help("eval perplexity every N steps (0 = only before and after)", 0)
    max_batches: int = _help("cap on eval batches of the eval split (0 = whole split)", 20)
    split: bool = _help("slimtune eval with data.source: score the eval split (as runs do) instead of every "
                        "train.seq_len window of the whole text", False)


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = _help("log to Weights & Biases (set WANDB_MODE=offline without network)", False)
    wandb_project: str = _help("wandb project name", "slimtune")
    progress: bool = _help("tqdm progress bar", True)


@dataclass(frozen=True)
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lq_lora: LQLoRAConfig = field(default_factory=LQLoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hooks: tuple[str, ...] = _help("trainer hooks by registered name (registry.HOOKS), run in this order", ())
    output_dir: str = _help("where metrics, report, checkpoints go", "runs/default")
    resume: bool = _help("continue from the newest complete checkpoint in output_dir", False)
    overwrite: bool = _help("allow a fresh run in an output_dir that already holds one", False)


# ---------------------------------------------------------------- building from dicts


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check `value` against annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            arms = typing.get_args(tp)
            if not arms:
                return tuple(value)
            return tuple(_coerce(f"{key}[{i}]", v, arms[0]) for i, v in enumerate(value))
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _build(cls, raw: dict, prefix: str = ""):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = [prefix + n for n in fields]
            raise ConfigError(f"unknown key '{prefix}{key}'{_suggest(prefix + str(key), full)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, raw[name], tp)
    return cls(**kwargs)


def all_keys(cls=RecipeConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {k: (to_dict(v) if dataclasses.is_dataclass(v) else plain(v)) for k, v in vars(cfg).items()}


# ---------------------------------------------------------------- recipes and overrides


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file '{recipe}' not found; give an existing .yaml path or one of: "
                              f"{', '.join(list_recipes())}")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe '{recipe}'{_suggest(recipe, list_recipes()).replace('keys', 'recipes')}")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections")
    return data


def apply_override(raw: dict, item: str) -> None:
    """`a.b=value` sets raw['a']['b'] to the YAML scalar parse of value; a string key takes the text as
    written (YAML 1.1 would read output_dir=off as False, or a pattern 2:4 as the integer 124)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.max_steps=50)")
    key, text = item.split("=", 1)
    key = key.strip()
    if key not in all_keys():
        raise ConfigError(f"unknown key '{key}'{_suggest(key, all_keys())}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if _annotation(key) is str and not isinstance(value, str):
        value = text.strip()
    _set(raw, key, value)


def _annotation(key: str):
    section, _, name = key.rpartition(".")
    cls = typing.get_type_hints(RecipeConfig)[section] if section else RecipeConfig
    return typing.get_type_hints(cls)[name]


def _set(raw: dict, key: str, value) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


def given_keys(recipe: str | None, overrides: list[str] = ()) -> set[str]:
    """Dotted keys the recipe file or the overrides set explicitly (the rest take dataclass defaults)."""
    raw = _read_yaml(recipe_path(recipe)) if recipe else {}
    for item in overrides:
        apply_override(raw, item)

    def walk(d, prefix=""):
        for k, v in d.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else (prefix + str(k),)

    return set(walk(raw))


def load_config(recipe: str | None, overrides: list[str] = ()) -> RecipeConfig:
    """Recipe name or YAML path (None = defaults only), then `key=value` overrides; validated."""
    raw = _read_yaml(recipe_path(recipe)) if recipe else {}
    for item in overrides:
        apply_override(raw, item)
    cfg = _build(RecipeConfig, raw)
    validate(cfg)
    return cfg


def choices(key: str) -> tuple | None:
    """The values `key` accepts: its registry's (a plugin kind) or the field's fixed set; None if any."""
    if key in BY_KEY:
        return BY_KEY[key].choices()
    section, _, name = key.rpartition(".")
    cls = typing.get_type_hints(RecipeConfig)[section] if section else RecipeConfig
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("choices")


def validate(cfg: RecipeConfig) -> None:
    """Value and cross-field rules; raises ConfigError naming the key and the fix."""
    flat = {k: _get(cfg, k) for k in all_keys()}
    for key, value in flat.items():
        allowed = choices(key)
        if allowed is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if v not in allowed:
                raise ConfigError(f"{key}={v!r} is not one of: {', '.join(map(str, allowed)) or '(none registered)'}")
    positive = ["train.max_steps", "train.seq_len", "train.batch_size", "train.grad_accum",
                "adapter.rank", "quant.block_size", "checkpoint.keep"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]} must be > 0")
    for key in ["train.warmup_steps", "train.loss_chunk_tokens", "checkpoint.every", "eval.every",
                "eval.max_batches", "train.max_grad_norm", "optim.weight_decay"]:
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]} must be >= 0")
    if not 0 < flat["train.lr"]:
        raise ConfigError(f"train.lr={flat['train.lr']} must be > 0")
    if not 0 < flat["data.eval_fraction"] < 1:
        raise ConfigError(f"data.eval_fraction={flat['data.eval_fraction']} must be in (0, 1)")
    if not 0 <= flat["adapter.dropout"] < 1:
        raise ConfigError(f"adapter.dropout={flat['adapter.dropout']} must be in [0, 1)")
    if not 0 <= flat["train.min_lr_ratio"] <= 1:
        raise ConfigError(f"train.min_lr_ratio={flat['train.min_lr_ratio']} must be in [0, 1]")
    if flat["adapter.alpha"] <= 0:
        raise ConfigError(f"adapter.alpha={flat['adapter.alpha']} must be > 0")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} must be two numbers in [0, 1)")
    tm = cfg.adapter.target_modules
    if isinstance(tm, str) and tm != "all-linear":
        raise ConfigError(f"adapter.target_modules={tm!r}: give a list like [q_proj, v_proj] or all-linear")
    if isinstance(tm, tuple) and (not tm or not all(isinstance(t, str) for t in tm)):
        raise ConfigError("adapter.target_modules: give a non-empty list of module names or all-linear")
    if cfg.quant.method != "none" and cfg.adapter.type == "none":
        raise ConfigError(f"quant.method={cfg.quant.method} needs adapter.type=lora: a quantized base is "
                          "frozen, so full fine-tuning cannot train it (set quant.method=none)")
    _validate_lowrank(cfg)
    _validate_optim(cfg)
    _validate_offload(cfg)
    _validate_precision(cfg)
    if cfg.quant.method == "nf4" and cfg.quant.block_size % 2:
        raise ConfigError(f"quant.block_size={cfg.quant.block_size} must be even for nf4 (2 codes per byte)")


def _validate_optim(cfg: RecipeConfig) -> None:
    o = cfg.optim
    for key in ("rank", "update_gap"):
        if getattr(o, key) <= 0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be > 0")
    if not 0 <= o.density <= 1:
        raise ConfigError(f"optim.density={o.density} must be in [0, 1]")
    if o.scale <= 0 or o.inactive_lr_scale < 0:
        raise ConfigError("optim.scale must be > 0 and optim.inactive_lr_scale >= 0")
    if o.state_bits == 8 and o.name in ("sgd", "adamw8bit"):
        raise ConfigError(f"optim.state_bits=8 applies to adamw, galore, frugal and dct, not optim.name={o.name}")
    if o.in_backward:
        if cfg.train.grad_accum != 1:
            raise ConfigError(f"optim.in_backward=true steps during backward, so it needs train.grad_accum=1 "
                              f"(got {cfg.train.grad_accum})")
        if o.name == "frugal" and o.subspace == "modules":
            raise ConfigError("optim.subspace=modules picks whole parameters across the model, which "
                              "optim.in_backward=true (one optimizer per parameter) cannot do; drop one")
        if cfg.train.max_grad_norm > 0:
            raise ConfigError("optim.in_backward=true frees each gradient in backward, so gradients cannot be "
                              "clipped: set train.max_grad_norm=0")


def _validate_offload(cfg: RecipeConfig) -> None:
    o = cfg.offload
    for key in ("prefetch", "io_threads"):
        if getattr(o, key) < 1:
            raise ConfigError(f"offload.{key}={getattr(o, key)} must be >= 1")
    if o.params == "none" and o.optimizer == "none":
        return
    if cfg.optim.in_backward:
        raise ConfigError("offload.* already steps each layer in backward; drop optim.in_backward=true")
    if cfg.optim.name == "frugal" and cfg.optim.subspace == "modules":
        raise ConfigError("optim.subspace=modules picks whole parameters across the model, which the offload "
                          "engine (one layer at a time) cannot do; use another optim.subspace or offload.*=none")
    if o.activations == "keep" and o.params == "disk" and cfg.quant.method != "none":
        raise ConfigError("offload.activations=keep would keep each layer's dequantized weights for backward on a "
                          "quantized streamed base; use offload.activations=recompute (or auto)")
    if cfg.optim.name == "adamw8bit":
        raise ConfigError("optim.name=adamw8bit (bitsandbytes) keeps its state on its own; with offload.* use "
                          "optim.name=adamw optim.state_bits=8 (slimtune's 8-bit states, streamed to disk)")


def _validate_precision(cfg: RecipeConfig) -> None:
    t = cfg.train
    if not 2 <= t.hadamard_block <= 256 or t.hadamard_block & (t.hadamard_block - 1):
        raise ConfigError(f"train.hadamard_block={t.hadamard_block} must be a power of two in [2, 256]")
    if t.precision != "default" and cfg.quant.method != "none":
        raise ConfigError(f"train.precision={t.precision} runs the linear layers' matmuls in low precision from "
                          f"full-precision weights, but quant.method={cfg.quant.method} already stores the base "
                          "quantized: set quant.method=none, or train.precision=default")


def _validate_lowrank(cfg: RecipeConfig) -> None:
    """Rules of LQ-LoRA and the LoftQ / EoRA initialisations."""
    a, q, lq = cfg.adapter, cfg.quant, cfg.lq_lora
    if (a.type == "lq_lora" and q.method != "lq_lora") or (q.method == "lq_lora" and a.type == "none"):
        raise ConfigError(f"adapter.type={a.type} with quant.method={q.method}: LQ-LoRA decomposes the base "
                          "into quantized + low-rank (LoRA) parts, so set adapter.type=lq_lora and quant.method=lq_lora")
    if q.method != "none" and q.backend != "slimtune" and (q.method not in ("nf4", "int8") or a.init != "default"):
        raise ConfigError(f"quant.method={q.method} adapter.init={a.init} needs quant.backend=slimtune "
                          "(bitsandbytes offers nf4/int8 with default init only)")
    if a.init != "default" and (a.type != "lora" or q.method in ("none", "lq_lora")):
        raise ConfigError(f"adapter.init={a.init} initialises LoRA on a quantized base: set adapter.type=lora and "
                          "a quant.method such as nf4 or nf3 (lq_lora already initialises its own factors)")
    for key in ("calibration_samples", "max_iters", "score_iters"):
        if getattr(lq, key) <= 0:
            raise ConfigError(f"lq_lora.{key}={getattr(lq, key)} must be > 0")
    if not lq.bits or not all(isinstance(b, int) and 2 <= b <= 8 for b in lq.bits):
        raise ConfigError(f"lq_lora.bits={list(lq.bits)}: give bit widths in 2..8, e.g. [2, 3, 4]")
    if not lq.block_sizes or not all(isinstance(b, int) and b > 0 for b in lq.block_sizes):
        raise ConfigError(f"lq_lora.block_sizes={list(lq.block_sizes)}: give positive block sizes, e.g. [64, 128]")
    if not min(lq.bits) <= lq.budget_bits <= max(lq.bits) + 1:
        raise ConfigError(f"lq_lora.budget_bits={lq.budget_bits} is outside the candidate range "
                          f"{min(lq.bits)}..{max(lq.bits) + 1} bits/param (lq_lora.bits={list(lq.bits)})")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace(cfg: RecipeConfig, **dotted) -> RecipeConfig:
    """Copy with dotted keys replaced, e.g. replace(cfg, **{"train.max_steps": 5})."""
    raw = to_dict(cfg)
    for key, value in dotted.items():
        if key not in all_keys():
            raise ConfigError(f"unknown key '{key}'{_suggest(key, all_keys())}")
        _set(raw, key, value)
    return _build(RecipeConfig, raw)


def dump_yaml(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
