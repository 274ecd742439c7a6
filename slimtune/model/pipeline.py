"""Model setup as one pipeline of stages, each in its own module, called in this order; none calls back up.

  1. load the base         model/load.py       HF dir, built-in name, quantized checkpoint (+ its factors);
                                                  a pruned base's masks are read here (model/recovery.py)
  2. quantize / decompose  model/quantize.py   quant.method (QUANT_FORMATS), LQ-LoRA, adapter.init
  3. adapters              adapters/inject.py     adapter.type (ADAPTERS); none = full fine-tuning
  3b. QAT                  quant/qat.py         qat.method: linears trained against their quantization
  4. recovery              model/recovery.py    masks held, the dense teacher (recover.*), data.select
  5. training precision    precision/swap.py     train.precision (PRECISIONS), adapter factors excluded
  6. engine                engines/ddp.py      activation checkpointing, device, loss module, DDP

After stage 1, loss.check_head refuses a model whose loss slimtune cannot reproduce. `build_for_eval` runs
stages 1-3 for a model to score: an adapter dir gets its base rebuilt as it was trained (quantization
included) and its weights loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.adapters import adapter_internals, adapter_modules, apply_adapters
from slimtune.adapters.lq_lora import apply_pv_tuning
from slimtune.engines.offload.load import load_streamed
from slimtune.model.load import load_base
from slimtune.formats.quantized import is_quantized_checkpoint
from slimtune.rules import load_dtype, needs_lowrank, placement
from slimtune.model.quantize import quantize_stage
from slimtune.model.recovery import Recovery, hold_masks, read_masks, recovery_stage
from slimtune.config import QuantConfig
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.hardware import fixed_dtype
from slimtune.lm_loss import check_head
from slimtune.formats.hf import DTYPES, adapter_metadata, empty_model
from slimtune.precision.swap import apply_precision
from slimtune.quant.qat import apply_qat, qat_hooks
from slimtune.registry import ADAPTER_FORMATS, ADAPTERS, ENGINES, PRECISIONS, QUANT_FORMATS, SECTIONS
from slimtune.technique import options_of
from slimtune.engines.ddp import Engine
from slimtune.memory import release_file_mappings, set_mmap_threshold, trim_heap
from slimtune.engines.offload.rundir import offload_dir, open_store
from slimtune.engines.offload.engine import OffloadEngine
from slimtune.engines.offload.settings import offload_active
from slimtune.engines.dist import DistInfo
from slimtune.engines.setup import EngineSetup
from slimtune.formats.final import final_format
from slimtune.optim import optimizer_options


def adapter_options(cfg):
    """The chosen adapter's own section (lora.*, sparse_ft.*), or None (adapter.type=none)."""
    return options_of(cfg, ADAPTERS.technique(cfg.adapter.type))


@dataclass
class Built:
    model: nn.Module  # the HF model, adapters inside
    engine: object  # trainer.engine.Engine (or an engine with its interface): forward/backward/step, saving
    info: dict = field(default_factory=dict)  # a decomposition's summary (LQ-LoRA allocation, errors, ...)
    recovery: Recovery | None = None  # a pruned base's masks, the teacher (model/recovery.py)
    hooks: list = field(default_factory=list)  # the adapter family's per-step work (adapters/base.py)


def build_base(cfg, train_blocks=None, log=print) -> tuple[nn.Module, dict, dict, dict]:
    """Stages 1-2 per `cfg` (RecipeConfig, concrete model.dtype): (model on CPU, the pruned base's manifest and
    masks (empty when not pruned), the quantization's summary). train_blocks feed calibration (LQ-LoRA ...)."""
    prebuilt = is_quantized_checkpoint(cfg.model.name)  # trainer/preflight.py checked what it allows
    model = load_base(cfg.model.name, cfg.model.dtype if prebuilt else load_dtype(cfg))
    check_head(model, cfg.model.name)
    manifest, masks = read_masks(cfg.model.name, model)
    info = {} if prebuilt else quantize_stage(model, cfg, train_blocks, log)
    _check_sparse_kept(model, masks, cfg)
    return model, manifest, masks, info


def add_adapters(model: nn.Module, cfg) -> None:
    """Stage 3: the adapters of cfg.adapter (with their own section), or the factors stages 1-2 installed (a
    quantized checkpoint, LQ-LoRA, LoftQ, EoRA) made trainable."""
    existing = adapter_modules(model)
    if existing:
        for m in existing.values():
            for p in m.trainable_parameters():
                p.requires_grad_(True)
    else:
        apply_adapters(model, cfg.adapter, adapter_options(cfg), DTYPES[cfg.optim.master_dtype])


def build_model(cfg, device: torch.device, dist_info: DistInfo = DistInfo(), train_blocks=None, log=print) -> Built:
    """Run the stages for training per `cfg` (RecipeConfig); train_blocks feed calibration (LQ-LoRA ...)."""
    if offload_active(cfg):
        return _build_offloaded(cfg, device, dist_info, log)
    model, manifest, masks, info = build_base(cfg, train_blocks, log)
    add_adapters(model, cfg)
    qat = apply_qat(model, cfg, adapter_internals(model)) if cfg.qat.method != "none" else 0
    if qat:
        log(f"qat.method={cfg.qat.method}: {qat} linear layers train against their quantization")
    pv = []
    if cfg.adapter.type == "lq_lora" and cfg.lq_lora.pv_tuning:
        pv = apply_pv_tuning(model, DTYPES[cfg.optim.master_dtype], cfg.lq_lora.pv_fraction)
        log(f"lq_lora.pv_tuning: {len(pv[0].modules) if pv else 0} quantized matrices PV-tuned beside their LoRA")
    recovery = recovery_stage(
        cfg.recover,
        model,
        manifest,
        masks,
        device,
        model_name=cfg.model.name,
        dtype=cfg.model.dtype,
        quant=cfg.quant,
        select=cfg.data.select,
        default_teacher=cfg.model.name if qat else None,  # QAT distils from the model before fake quantization
        log=log,
    )
    precision = cfg.train.precision
    technique = PRECISIONS.get(precision) if precision != "default" else None
    n = apply_precision(model, precision, options_of(cfg, technique), skip=adapter_internals(model))
    if n:
        log(f"train.precision={cfg.train.precision}: {n} linear layers compute in low precision")
    hooks = (
        (
            ADAPTERS.get(cfg.adapter.type).training_hooks(model, adapter_options(cfg), cfg.train.max_steps)
            if cfg.adapter.type != "none"
            else []
        )
        + qat_hooks(model, cfg)
        + pv
    )
    release_file_mappings(model)  # the loaded file's pages would stay resident all run
    trim_heap()  # and so would what loading and quantizing freed
    engine_cls = Engine if cfg.engine.name == "offload" else ENGINES.get(cfg.engine.name)  # offload: nothing on disk
    built = Built(
        model, engine_cls(model, engine_setup(cfg, engine_cls), device, dist_info, recovery), info, recovery, hooks
    )
    return built


def engine_setup(cfg, engine_cls) -> EngineSetup:
    """The engine's sections of RecipeConfig `cfg` and the other sections' values it uses."""
    params, optimizer = placement(cfg)
    return EngineSetup(
        engine=cfg.engine,
        options=options_of(cfg, engine_cls),
        train=cfg.train,
        optim=cfg.optim,
        optim_options=optimizer_options(cfg),
        cram=cfg.cram if cfg.optim.cram else None,
        dtype=cfg.model.dtype,
        output_dir=cfg.output_dir,
        params=params,
        optimizer=optimizer,
        full=cfg.adapter.type == "none",
        quant_method=cfg.quant.method,
        final=final_format(cfg),
    )


def _build_offloaded(cfg, device, dist_info, log) -> Built:
    """The same stages with the offload engine: the base streamed into the store unit by unit
    (engine.params=disk) or loaded as usual, adapters, then OffloadEngine; the loss check runs last (it
    needs the engine's streaming)."""
    name, (params, optimizer) = cfg.model.name, placement(cfg)  # config.validate refused what the store cannot hold
    full = cfg.adapter.type == "none"
    meta = empty_model(name, cfg.model.dtype)
    numel = sum(p.numel() for p in meta.parameters())
    store = open_store(cfg, numel, numel if full else 0, dist_info.rank, dist_info.world)
    del meta
    engine = None
    try:
        if params == "disk":
            model = load_streamed(
                name, cfg.model.dtype, store, trainable=full, quant=cfg.quant, master=cfg.optim.master_dtype
            )
        else:
            model = load_base(name, load_dtype(cfg))
            quantize_stage(model, cfg)
        apply_adapters(model, cfg.adapter, adapter_options(cfg), DTYPES[cfg.optim.master_dtype])
        qat = apply_qat(model, cfg, adapter_internals(model)) if cfg.qat.method != "none" else 0
        set_mmap_threshold(OffloadEngine.heap_mmap_threshold)  # the engine's allocator setting, for this process
        setup = engine_setup(cfg, OffloadEngine)
        engine = OffloadEngine(model, setup, device, dist_info, store, streamed_weights=params == "disk")
        check_head(model, name)
        engine.streamer.release_all()
    except BaseException:  # the store's threads and its lock go with the error
        engine.close() if engine is not None else store.close(delete=True)
        raise
    if qat:
        log(f"qat.method={cfg.qat.method}: {qat} linear layers train against their quantization")
    log(
        f"offload: engine.params={params} engine.optimizer={optimizer}, store in {offload_dir(cfg)} "
        f"({engine.pool.nbytes / 2**20:.0f} MiB of buffers)"
    )
    return Built(model, engine, {}, hooks=qat_hooks(model, cfg))


def _check_sparse_kept(model: nn.Module, masks: dict, cfg) -> None:
    """A pruned base must stay sparse once quantized: NF4 / INT-k keep a 0 exactly, but a decomposition
    (LQ-LoRA, LoftQ, EoRA) quantizes W - L1 L2, which is not 0 where W was pruned."""
    from slimtune.quant import dequantize_weight, is_quantized_linear

    for name, mask in masks.items():
        m = model.get_submodule(name)
        base = getattr(m, "base", m)
        if is_quantized_linear(base) and bool((dequantize_weight(base)[~mask.bool()] != 0).any()):
            raise ConfigError(
                f"model.name={cfg.model.name!r} is pruned, but quant.method={cfg.quant.method} / "
                f"adapter.init={cfg.adapter.init} makes its pruned weights nonzero ({name}): use "
                "quant.method=nf4 or int8 with adapter.init=default (the LoRA update is masked), or "
                "`slimtune export PRUNED --format sparse-nf4 --rank R` for LQ-LoRA factors on the "
                "kept weights, then train that"
            )


def with_recorded_quant(cfg, record: dict, adapter_dir: Path):
    """cfg with the base's quantization an adapter dir recorded (formats/final.quant_record): quant.* and the
    format's own section."""
    record = dict(record)
    options = record.pop("options", None)
    try:
        cfg = dataclasses.replace(cfg, quant=QuantConfig(**record))
        section = getattr(QUANT_FORMATS.get(cfg.quant.method), "section", None)
        if options is not None and section is not None:
            cfg = dataclasses.replace(cfg, **{section: SECTIONS[section](**options)})
    except (TypeError, ConfigError) as e:
        raise SlimtuneError(
            f"{adapter_dir / 'slimtune_adapter.json'}: bad 'quant' record ({e}); re-save the "
            "adapter with slimtune or fix the record"
        ) from None
    return cfg


def build_for_eval(cfg) -> nn.Module:
    """The model `slimtune eval model.name=...` scores (CPU, eval mode): an HF dir or built-in name
    (quantized per cfg.quant, if set), a quantized checkpoint, or an adapter dir (e.g. runs/a/final) on the
    base it was trained on, quantized as recorded in its slimtune_adapter.json. model.dtype=auto: fp32."""
    cfg = fixed_dtype(cfg)
    name = cfg.model.name
    meta = None if is_quantized_checkpoint(name) else adapter_metadata(Path(name).expanduser())
    if meta is not None and (Path(name).expanduser() / "config.json").is_file():
        meta = None  # a full model dir that also carries adapter files: score the model itself
    stage_cfg = with_recorded_quant(cfg, meta["quant"], Path(name)) if meta is not None and meta["quant"] else cfg
    quant = stage_cfg.quant
    if needs_lowrank(stage_cfg):
        raise ConfigError(
            f"slimtune eval with quant.method={quant.method} adapter.init={cfg.adapter.init}: the "
            "decomposition needs calibration data; write it with `slimtune quantize ... output_dir=DIR` "
            "and evaluate model.name=DIR"
        )
    base = meta["model_name"] if meta else name
    # a base quantized on load (quant.method, or the format an adapter was trained against) is decoded once
    # and quantized: its linears then stay compressed in their quantized form, which keep_compressed's
    # per-layer decode would only duplicate
    keep = cfg.model.keep_compressed and quant.method == "none"
    if cfg.model.keep_compressed and not keep:
        print(
            f"slimtune: model.keep_compressed=true with quant.method={quant.method}: the checkpoint is decoded "
            f"once and its linears quantized ({quant.method}), which keeps them compressed in memory"
        )
    model = load_base(base, load_dtype(stage_cfg), keep)
    check_head(model, name)
    _, masks = read_masks(base, model)
    if not is_quantized_checkpoint(name):
        quantize_stage(model, stage_cfg)
    if meta is not None:
        ADAPTER_FORMATS.get(meta["format"]).load(model, Path(name).expanduser())
        hold_masks(model, masks)  # an adapter trained on a pruned base learned mask * (B A)
    return model.eval()
