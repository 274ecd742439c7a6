"""The recipe schema's core sections: one frozen dataclass per section, each field with its default and help.

A technique's own options live in its own file, as a section it registers with `config_section` (galore.*,
lora.*, deepspeed.*, ...); `config.recipe_class()` puts the core and every registered section together.
`config.py` builds them from YAML + overrides and validates them; keys that pick a plugin (adapter.type,
optim.name, ...) take their allowed values from the plugin registries.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from slimtune.registry import SECTIONS


def _help(text: str, default, choices: tuple | None = None, ratio: bool = False, fixed: bool = False, **kw):
    """A field with its help text; `choices` for a fixed set of values (keys that pick a plugin take theirs
    from the plugin registry instead: registry.BY_KEY). ratio: an "N:M" string, which YAML 1.1 reads as a
    base-60 integer when unquoted (2:4 -> 124); config turns such an integer back into its text. fixed: a
    resumed run must keep the value (it changes what the saved state means)."""
    meta = {"help": text} if choices is None else {"help": text, "choices": tuple(choices)}
    if ratio:
        meta["ratio"] = True
    if fixed:
        meta["fixed"] = True
    return field(default=default, metadata=meta, **kw)


option = _help  # for a technique's own section


def config_section(name: str, fixed: bool = False):
    """Register a frozen dataclass as the config section `name` (its keys read `name.field`). fixed: a resumed
    run must keep every key of the section (as `option(..., fixed=True)` says of one key)."""

    def deco(cls):
        cls.fixed_on_resume = fixed
        SECTIONS.register(name)(cls)
        return cls

    return deco


KERNEL_BACKENDS = ("auto", "reference", "triton")  # train.kernels (kernels/dispatch.py reads it from here)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _help("local HF causal-LM dir, or smollm2-135m | tiny-llama", "smollm2-135m")
    dtype: str = _help(
        "auto | float32 | bfloat16: storage of frozen weights and autocast compute dtype; auto: "
        "bf16 where the hardware multiplies it fast (CUDA bf16, CPU AVX512-BF16/AMX), else fp32 "
        "(eval, generate, export: fp32 unless given)",
        "auto",
        ("auto", "float32", "bfloat16"),
    )
    keep_compressed: bool = _help(
        "eval / generate on a compressed checkpoint (slimtune export --format ...): keep "
        "its decoder layers encoded in memory, decoding each layer at its forward (less "
        "memory, a decode of every layer per forward)",
        False,
    )


@dataclass(frozen=True)
class DataConfig:
    source: str = _help(
        "pydoc | a .txt | a .jsonl or .parquet of records (text, prompt/response or messages) | "
        "a datasets.save_to_disk directory",
        "pydoc",
    )
    packing: str = _help(
        "documents (blocks of whole documents, no attention across them) | stream (one token "
        "stream cut into blocks) | none (a padded row per document, length-grouped)",
        "documents",
        ("documents", "stream", "none"),
    )
    train_on: str = _help(
        "assistant (loss on assistant turns / responses only) | all", "assistant", ("assistant", "all")
    )
    chat_template: str = _help("a Jinja chat template file for 'messages' records (default: the tokenizer's)", "")
    eval_fraction: float = _help("fraction of packed blocks held out for eval (deterministic)", 0.05)
    sources: tuple = _help(
        "a mixture instead of data.source: [{source: a.jsonl, weight: 0.7}, {source: pydoc, weight: 0.3}], "
        "train blocks drawn by weight with train.seed, each source split and cached on its own",
        (),
    )
    num_proc: int = _help("processes tokenizing a source into the cache (0: every core for a source over 32 MB)", 0)
    cache_dir: str = _help(
        "where sources are tokenized once, as memory-mapped token files (default: "
        "$SLIMTUNE_CACHE/data, ~/.cache/slimtune/data)",
        "",
    )
    select: str = _help(
        "recovery data: all | degradation (blocks the pruning hurt most, spread over k-means "
        "clusters of the dense model's hidden states; PASER-like) | random",
        "all",
        ("all", "degradation", "random"),
    )
    select_fraction: float = _help("data.select: fraction of the training blocks kept", 0.25)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = _help("optimizer steps", 100)
    epochs: float = _help(
        "> 0: passes over the train blocks, which sets max_steps (each block once per epoch, "
        "in a seeded order per epoch)",
        0.0,
    )
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
    kernels: str = _help(
        "auto (Triton kernels on CUDA when triton is installed) | reference (torch only) | triton "
        "(always; CPU tensors need TRITON_INTERPRET=1). The SLIMTUNE_KERNELS environment "
        "variable overrides it",
        "auto",
        KERNEL_BACKENDS,
    )
    precision: str = _help(
        "matmuls of the linear layers (lm_head excluded): default (model.dtype) | fp8 (e4m3 "
        "forward, e5m2 gradients) | halo (fp8 + Hadamard rotations; halo.*) | mxfp4 (Quartet QAT)",
        "default",
    )


@dataclass(frozen=True)
class AdapterConfig:
    type: str = _help(
        "lora | dora (weight-decomposed LoRA: a trained magnitude per output row) | lq_lora (needs "
        "quant.method=lq_lora) | sparse_ft | none (full fine-tuning); lora.* / sparse_ft.* hold their "
        "options",
        "lora",
    )
    target_modules: typing.Union[str, tuple[str, ...]] = _help(
        "module names (suffix match) or all-linear", "all-linear"
    )
    init: str = _help(
        "default (B=0) | loftq (alternate quantize/SVD) | eora (activation-weighted SVD of the "
        "quantization error); loftq/eora need a slimtune quant.method | pissa (principal singular "
        "vectors as the factors, the base keeps the residual; any base)",
        "default",
    )


@dataclass(frozen=True)
class QuantConfig:
    method: str = _help(
        "none | nf4 | int8 | nf2 | nf3 | int2..int7 | int2a..int8a (asymmetric) | q8_0 | q4_0 | q4_1 | q5_0 | "
        "q5_1 (llama.cpp's block types) | lq_lora (per-matrix formats under lq_lora.budget_bits)",
        "none",
    )
    backend: str = _help("slimtune | bitsandbytes", "slimtune")
    block_size: int = _help("weights per absmax block", 64)
    double_quant: bool = _help("quantize the NF4 block scales to 8 bits (saves ~0.4 bit/param)", True)


@dataclass(frozen=True)
class OptimConfig:
    name: str = _help(
        "adamw | adamw8bit (bitsandbytes) | sgd | galore | frugal | dct (their options: sgd.*, "
        "galore.*, frugal.*, dct.*)",
        "adamw",
    )
    weight_decay: float = _help("decoupled weight decay", 0.0)
    betas: tuple[float, ...] = _help("Adam betas", (0.9, 0.999))
    eps: float = _help("Adam epsilon", 1e-8)
    state_bits: int = _help("32 | 8: block-wise 8-bit Adam moments (adamw, galore, frugal, dct)", 32, (32, 8))
    master_dtype: str = _help(
        "float32 | bfloat16: the trained weights' dtype in full fine-tuning (bf16: half their memory and offload "
        "store; the updates go through optim.compensation)",
        "float32",
        ("float32", "bfloat16"),
    )
    compensation: str = _help(
        "auto | none | kahan | stochastic: how bf16 master weights take fp32 updates (stochastic rounding, or "
        "Kahan summation with a bf16 buffer); auto: stochastic with bfloat16, none with float32",
        "auto",
        ("auto", "none", "kahan", "stochastic"),
    )
    in_backward: bool = _help(
        "step each parameter in backward and free its gradient (grad_accum 1, no clipping)", False
    )
    full_rank_modules: tuple[str, ...] = _help(
        "galore / dct / frugal: modules (name suffix) kept on plain AdamW", ("embed_tokens", "lm_head")
    )
    lora_plus_ratio: float = _help(
        "LoRA+: lora_B (and DoRA's magnitude) train at lr x this ratio (16 is the paper's choice); 0 = off", 0.0
    )
    cram: bool = _help(
        "compression-aware training (CrAM+): each step also takes the gradient at the top-k "
        "compressed w + rho g (two forward/backward passes per step); see the cram section",
        False,
    )


PATTERNS = ("unstructured", "2:4", "4:8")


@dataclass(frozen=True)
class PruneConfig:
    method: str = _help("magnitude | wanda (|W| x input norm) | sparsegpt (OBS with weight updates)", "wanda")
    sparsity: float = _help("fraction of each matrix's weights set to 0 (pattern=unstructured)", 0.5)
    pattern: str = _help(
        "unstructured | 2:4 | 4:8 (N:M: N kept in every M consecutive inputs)", "unstructured", PATTERNS, ratio=True
    )
    scope: str = _help("unstructured: the sparsity holds per output row | per layer (matrix)", "row", ("row", "layer"))
    calibration_samples: int = _help("train.seq_len blocks of data.source run through the model, layer by layer", 32)


@dataclass(frozen=True)
class RecoverConfig:
    ce: float = _help("weight of the cross-entropy on the data", 1.0)
    kd: float = _help("weight of T^2 KL(teacher || student) over target tokens (needs a teacher)", 0.0)
    feature: float = _help("weight of SquareHead: per layer ||h_s - h_t||^2 / ||h_t||^2, averaged over layers", 0.0)
    temperature: float = _help("KD temperature T", 1.0)
    teacher: str = _help("the dense teacher (default: the source model in the sparse model's manifest)", "")
    teacher_quant: str = _help("hold the teacher in NF4 to halve its memory: none | nf4", "none", ("none", "nf4"))


@dataclass(frozen=True)
class EngineConfig:
    name: str = _help(
        "ddp (one process, or DDP under torchrun) | fsdp2 (torch fully_shard per decoder layer) | "
        "deepspeed (ZeRO; deepspeed.*) | offload (slimtune's layer streaming from disk; offload.*)",
        "ddp",
    )
    params: str = _help(
        "where the weights live between uses: auto (the engine's default: disk for offload, else "
        "none) | none (RAM / GPU memory) | cpu (pinned host memory) | disk (offload: its store; "
        "deepspeed: NVMe, ZeRO-3)",
        "auto",
        ("auto", "none", "cpu", "disk"),
    )
    optimizer: str = _help(
        "where the optimizer state (and fp32 master weights) lives: auto | none | cpu | disk",
        "auto",
        ("auto", "none", "cpu", "disk"),
    )


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _help("save every N steps (0 = only at the end)", 0)
    keep: int = _help("how many step checkpoints to keep", 2)


@dataclass(frozen=True)
class EvalConfig:
    every: int = _help("eval perplexity every N steps (0 = only before and after)", 0)
    max_batches: int = _help("cap on eval batches of the eval split (0 = whole split)", 20)
    split: bool = _help(
        "slimtune eval with data.source: score the eval split (as runs do) instead of every "
        "train.seq_len window of the whole text",
        False,
    )


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
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hooks: tuple[str, ...] = _help("trainer hooks by registered name (registry.HOOKS), run in this order", ())
    output_dir: str = _help("where metrics, report, checkpoints go", "runs/default")
    resume: bool = _help("continue from the newest complete checkpoint in output_dir", False)
    overwrite: bool = _help("allow a fresh run in an output_dir that already holds one", False)
