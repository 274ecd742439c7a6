"""The checks a run passes before anything loads: the config's own rules (config.validate, already run by
load_config) and those that depend on what `model.name` is (a pruned model, a quantized checkpoint, a
compressed export), read from its small JSON files only. A combination either passes here and trains, or is
refused here in one line naming both keys (tests/test_combinations.py holds every pair to that).
"""

from __future__ import annotations

from slimtune.formats.pruned import MANIFEST as SPARSE_MANIFEST
from slimtune.formats.pruned import is_sparse_model
from slimtune.formats.quantized import is_quantized_checkpoint
from slimtune.rules import needs_lowrank
from slimtune.errors import ConfigError


def check_run(cfg, world: int = 1) -> None:
    """Refuse (ConfigError, one line) a run `cfg` cannot train, before loading anything."""
    name = cfg.model.name
    if cfg.model.keep_compressed:
        raise ConfigError("model.keep_compressed=true is for slimtune eval and generate (each layer is decoded for "
                          "its forward only); training decodes the checkpoint once at load: drop it")
    if cfg.optim.in_backward and world > 1:
        raise ConfigError("optim.in_backward=true is single-process only (DDP reduces gradients after the "
                          "per-parameter step would run); drop it under torchrun")
    pruned, prebuilt = is_sparse_model(name), is_quantized_checkpoint(name)
    _check_offload(cfg, pruned, prebuilt)
    _check_prebuilt(cfg, prebuilt)
    _check_recovery(cfg, pruned)


def _check_offload(cfg, pruned: bool, prebuilt: bool) -> None:
    o = cfg.offload
    if "disk" not in (o.params, o.optimizer):
        return
    if prebuilt:
        raise ConfigError(f"offload.params/optimizer=disk with model.name={cfg.model.name!r} (a quantized checkpoint): "
                          "quantized checkpoints are not streamed yet; quantize on load instead (quant.method=nf4 ...)")
    if needs_lowrank(cfg):
        raise ConfigError(f"offload.params/optimizer=disk with quant.method={cfg.quant.method} adapter.init="
                          f"{cfg.adapter.init}: LQ-LoRA / LoftQ / EoRA bases are not streamed yet; use a uniform "
                          "format (quant.method=nf4, int8, nf3, ...) or offload.params=none offload.optimizer=none")
    if cfg.quant.backend != "slimtune":
        raise ConfigError(f"offload.params/optimizer=disk with quant.backend={cfg.quant.backend}: the store holds "
                          "slimtune's own formats; use quant.backend=slimtune")
    if cfg.train.precision != "default":
        raise ConfigError(f"train.precision={cfg.train.precision} with offload.params/optimizer=disk is not "
                          "supported yet; use train.precision=default, or offload.params=none offload.optimizer=none")
    if pruned or cfg.recover.kd or cfg.recover.feature or cfg.data.select != "all":
        raise ConfigError(f"offload.params/optimizer=disk does not run recovery yet (model.name={cfg.model.name!r} "
                          "pruned, recover.kd / recover.feature, data.select); set offload.params=none "
                          "offload.optimizer=none")
    if cfg.adapter.type == "none" and o.params == "disk" and o.optimizer != "disk":
        raise ConfigError("offload.params=disk with full fine-tuning (adapter.type=none) keeps the fp32 master weights "
                          "on disk, so their optimizer state goes there too: set offload.optimizer=disk")


def _check_prebuilt(cfg, prebuilt: bool) -> None:
    if not prebuilt:
        return
    if cfg.adapter.type == "none":
        raise ConfigError(f"model.name={cfg.model.name!r} is a quantized checkpoint: its base is frozen, so train it "
                          "with adapter.type=lora or lq_lora, not full fine-tuning (adapter.type=none)")
    if cfg.train.precision != "default":
        raise ConfigError(f"train.precision={cfg.train.precision} needs full-precision linears, but "
                          f"model.name={cfg.model.name!r} is a quantized checkpoint: use train.precision=default")


def _format(q):
    from slimtune.registry import QUANT_FORMATS

    return QUANT_FORMATS.get(q.method).format_for(q.method, q.block_size, q.double_quant)


def _check_recovery(cfg, pruned: bool) -> None:
    name, a, q = cfg.model.name, cfg.adapter, cfg.quant
    if pruned and (q.method == "lq_lora" or a.init != "default"):
        key = "quant.method=lq_lora" if q.method == "lq_lora" else f"adapter.init={a.init}"
        raise ConfigError(f"{key} on model.name={name!r} (pruned): the decomposition makes its pruned weights "
                          "nonzero; use adapter.init=default with quant.method=none, nf4, int8 ... (the adapter's "
                          "update is masked), or `slimtune export PRUNED --format sparse-nf4 --rank R`")
    if pruned and q.method not in ("none", "lq_lora") and not _format(q).exact_zero:
        raise ConfigError(f"quant.method={q.method} on model.name={name!r} (pruned): the format does not hold 0 "
                          "exactly (asymmetric INT-k spans each block's [min, max]), so the pruned weights would "
                          "become nonzero; use a symmetric or NF format (int4, nf4, nf3, ...)")
    if pruned and a.type == "none" and cfg.engine.name in ("fsdp2", "deepspeed"):
        raise ConfigError(f"engine.name={cfg.engine.name} with model.name={name!r} (pruned) and adapter.type=none: "
                          "full fine-tuning holds masks on whole weights, which the engine shards; use "
                          "adapter.type=lora or engine.name=ddp")
    if not pruned and not cfg.recover.teacher:
        if cfg.recover.kd or cfg.recover.feature:
            raise ConfigError(f"recover.kd / recover.feature need a teacher: model.name={name!r} has no "
                              f"{SPARSE_MANIFEST} naming its dense source; set recover.teacher=MODEL")
        if cfg.data.select == "degradation":
            raise ConfigError(f"data.select=degradation compares the pruned model with its dense source: "
                              f"model.name={name!r} has no {SPARSE_MANIFEST}; give a pruned model or recover.teacher")
