"""Recovery of a pruned model (the `recover` recipe, or any run on a `slimtune prune` output).

The model setup's recovery stage, between loading and the engine:
  * masks: a base with slimtune_sparse.json keeps its zeros. Full fine-tuning masks each gradient and
    re-zeroes pruned entries after every optimizer step (prune/masks.MaskedParams); a LoRA adapter on it
    learns mask * (B A), so the merged model stays sparse (adapters/lora.set_weight_mask).
  * teacher: with recover.kd or recover.feature > 0, the dense model (recover.teacher, else the manifest's
    source_model) runs beside the student without gradients, optionally in NF4; the training loss becomes
    prune/distill.RecoveryLoss. Eval perplexity stays plain cross-entropy.
  * data: data.select=degradation keeps the training blocks the pruning hurt most (prune/select),
    data.select=random a random subset of the same size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from slimtune.prune.distill import RecoveryLoss, Teacher
from slimtune.prune.masks import MaskedParams, hold_masks  # noqa: F401  (hold_masks: re-exported)
from slimtune.formats.pruned import MANIFEST, is_sparse_model, load_masks, read_sparse_manifest
from slimtune.prune.select import random_blocks, select_recovery_data
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.schema import RecoverConfig


@dataclass
class Recovery:
    manifest: dict | None = None  # the sparse base's slimtune_sparse.json
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> keep mask (True = kept)
    held: MaskedParams | None = None  # full fine-tuning: the trained weights' masks
    teacher: Teacher | None = None
    teacher_model: nn.Module | None = None
    options: RecoverConfig | None = None  # recover.*

    def loss(self, model: nn.Module, chunk_tokens: int) -> nn.Module | None:
        """The training loss when distilling (None: plain cross-entropy); chunk_tokens: train.loss_chunk_tokens."""
        r = self.options
        if self.teacher is None:
            return None
        return RecoveryLoss(
            model,
            self.teacher,
            ce=r.ce,
            kd=r.kd,
            feature=r.feature,
            temperature=r.temperature,
            chunk_tokens=chunk_tokens,
        )

    def mask_tensors(self) -> dict[str, torch.Tensor]:
        return self.held.state_dict() if self.held is not None else {}


def read_masks(name: str, model: nn.Module) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(manifest, module name -> mask) of a sparse base (None, {} for a dense one); read before the base is
    quantized, from its full-precision weights."""
    if not is_sparse_model(name):
        return None, {}
    return read_sparse_manifest(name), load_masks(name, model)


def load_teacher(
    r: RecoverConfig,
    manifest: dict | None,
    model_name: str,
    dtype: str,
    quant,
    log=print,
    default: str | None = None,
) -> nn.Module | None:
    """The dense teacher when recover.kd / recover.feature need one (frozen, eval mode, on CPU). r: the
    recover section; model_name, dtype: model.name / model.dtype; quant: the quant section (a quantized
    teacher takes its block size and double quant); default: the teacher when neither recover.teacher nor a
    sparse manifest names one (QAT: model.name itself)."""
    if r.kd == 0 and r.feature == 0:
        return None
    name = r.teacher or (manifest or {}).get("source_model") or default
    if not name:
        raise ConfigError(
            f"recover.kd / recover.feature need a teacher: model.name={model_name!r} has no "
            f"{MANIFEST} naming its dense source; set recover.teacher=MODEL"
        )
    from slimtune.model.load import load_base
    from slimtune.formats.hf import DTYPES
    from slimtune.quant import quantize_model

    t0 = time.perf_counter()
    try:
        teacher = load_base(name, dtype)
    except SlimtuneError as e:
        raise SlimtuneError(f"recover.teacher={name!r}: {e}") from None
    if r.teacher_quant != "none":
        quantize_model(
            teacher,
            r.teacher_quant,
            block_size=quant.block_size,
            double_quant=quant.double_quant,
            compute_dtype=DTYPES[dtype],
        )
    teacher.eval().requires_grad_(False)
    log(
        f"recover: teacher {name} ({r.teacher_quant if r.teacher_quant != 'none' else dtype}, "
        f"{time.perf_counter() - t0:.1f}s)"
    )
    return teacher


def recovery_stage(
    r: RecoverConfig,
    model: nn.Module,
    manifest: dict | None,
    masks: dict,
    device: torch.device,
    *,
    model_name: str,
    dtype: str,
    quant,
    select: str = "all",
    default_teacher: str | None = None,
    log=print,
) -> Recovery | None:
    """Masks held and the teacher loaded (after the adapters stage). None when nothing applies. r: the
    recover section; select: data.select; default_teacher, the rest: as load_teacher."""
    needs_teacher = r.kd > 0 or r.feature > 0
    if manifest is None and not needs_teacher and select == "all":
        return None
    rec = Recovery(manifest, masks, hold_masks(model, masks), options=r)
    if masks:
        kept = sum(int(m.sum()) for m in masks.values()) / max(sum(m.numel() for m in masks.values()), 1)
        log(
            f"recover: {len(masks)} pruned matrices ({manifest.get('method')} {manifest.get('pattern')}, "
            f"{1 - kept:.3f} sparse) held sparse"
        )
    teacher = load_teacher(r, manifest, model_name, dtype, quant, log, default_teacher)
    if teacher is not None:
        rec.teacher_model = teacher.to(device)
        rec.teacher = Teacher(teacher)
    return rec


def select_data(d, t, rec: Recovery | None, model: nn.Module, blocks, device, dtype: str, log=print):
    """data.select: the training blocks to recover on (all of them for data.select=all). d, t: the data and
    train sections; dtype: model.dtype (of the dense model scored against)."""
    if d.select == "all":
        return blocks
    if d.select == "random":
        idx = random_blocks(len(blocks), d.select_fraction, t.seed)
        log(f"data.select=random: {len(idx)} of {len(blocks)} blocks")
        return blocks.subset(idx)
    dense = rec.teacher_model if rec is not None else None
    if dense is None:  # no teacher for the loss: the dense model only for the scores
        teacher = rec.options.teacher if rec is not None else ""
        name = teacher or ((rec.manifest or {}).get("source_model") if rec else None)
        if not name:
            raise ConfigError(
                "data.select=degradation compares the pruned model with its dense source: give a "
                f"sparse model.name (with {MANIFEST}) or recover.teacher=MODEL"
            )
        from slimtune.model.load import load_base

        dense = load_base(name, dtype).to(device).eval()
    t0 = time.perf_counter()
    subset, summary = select_recovery_data(
        dense,
        model,
        blocks,
        d.select_fraction,
        seed=t.seed,
        batch_size=t.batch_size,
        chunk_tokens=t.loss_chunk_tokens,
    )
    log(
        f"data.select=degradation: {summary['n_selected']} of {summary['n_candidates']} blocks in "
        f"{summary['clusters']} clusters (mean degradation {summary['mean_score_selected']:.3f} vs "
        f"{summary['mean_score_all']:.3f} for all, {time.perf_counter() - t0:.1f}s)"
    )
    return subset
