"""The engine stage of model setup: how the built model runs forward, backward and the optimizer step.

`Engine` is the in-memory one (DDP under torchrun): activation checkpointing, the model on its device, the
loss module (loss.CausalLMLoss, one forward for DDP), the optimizer, clipping, checkpoints and the final
save. An engine that replaces forward/backward/step (engines/offload/engine.OffloadEngine, later FSDP or DeepSpeed)
implements the same few methods, so loop.py does not change with it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.adapters import adapter_modules
from slimtune.adapters.base import checkpoint_state, load_checkpoint_state
from slimtune.formats.pruned import write_sparse_manifest
from slimtune.lm_loss import CausalLMLoss
from slimtune.optim import build_optimizer
from slimtune.optim.cram import wrap_cram
from slimtune.formats import checkpoint as ckpt
from slimtune.engines.dist import DistInfo
from slimtune.quant import is_quantized_linear
from slimtune.errors import ConfigError
from slimtune.engines.setup import EngineSetup
from slimtune.registry import ENGINES
from slimtune.rules import placement
from slimtune.technique import Technique


def activation_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs and DDP
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def in_memory(cfg) -> None:
    """engine.params / engine.optimizer must be none for an engine that keeps everything in (GPU) memory."""
    for key, where in zip(("params", "optimizer"), placement(cfg)):
        if where != "none":
            raise ConfigError(
                f"engine.{key}={where} with engine.name={cfg.engine.name}: this engine keeps {key} in "
                "memory; use engine.name=offload (slimtune's disk offload) or deepspeed (its own "
                "cpu / nvme offload)"
            )


@ENGINES.register("ddp")
class Engine(Technique):
    """In-memory training (DDP under torchrun). The engine interface: every engine
    implements make_optimizer, forward_backward, clip_grad_norm, step, evaluate, save_checkpoint,
    load_checkpoint, save_final, count_params, report and close (this class is the in-memory one)."""

    section = None  # the engine's own config section (deepspeed.*, offload.*)

    @classmethod
    def validate(cls, cfg) -> None:
        in_memory(cfg)

    @classmethod
    def memory_terms(cls, cfg, model, s, world: int, device: str):
        """One rank's sizes under this engine, for the planner: `s` (plan/engines.Sizes, bytes: frozen,
        trainable, grads, state, step, engine, offload) adjusted in place and returned; `model`
        (plan/engines.ModelSizes) says what a decoder layer and the rest of the model weigh. DDP: world > 1 adds
        the reducer's gradient buckets (a second copy of the gradients, fp32)."""
        if world > 1:
            s.engine = s.grads
        return s

    sharded = False  # FSDP2 / ZeRO-3: every rank must run each forward (eval pads its batches)
    gathers_state = False  # sharded weights or optimizer state (FSDP2, ZeRO 1-3): every rank saves, rank 0 writes

    def __init__(
        self, model: nn.Module, setup: EngineSetup, device: torch.device, info: DistInfo, recovery=None, wrap=True
    ):
        """setup: the engine's sections and what it needs of the others (engines/setup.py); wrap: DDP under
        torchrun (an engine that shards the model itself passes False)."""
        t = setup.train
        self.model, self.setup, self.device, self.info = model, setup, device, info
        self.options = setup.options  # the engine's own section (None for ddp)
        self.recovery = recovery  # model/recovery.Recovery: masks held, the teacher's loss
        if t.activation_checkpointing:
            activation_checkpointing(model)
        model.to(device)
        self.loss_model = CausalLMLoss(model, t.loss_chunk_tokens)  # eval: plain cross-entropy
        train_loss = (recovery.loss(model, t.loss_chunk_tokens) if recovery is not None else None) or self.loss_model
        # quantized bases are built identically on every rank, so buffers need no broadcast
        self.train_model = (
            nn.parallel.DistributedDataParallel(train_loss, broadcast_buffers=False)
            if info.enabled and wrap
            else train_loss
        )
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.dtype == "bfloat16")

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.Optimizer:
        s = self.setup
        self.optimizer = build_optimizer(s.optim, self.trainable(), s.train.lr, s.optim_options)
        if s.optim.cram:
            self.optimizer = wrap_cram(self.optimizer, s.cram)
        if self.recovery is not None and self.recovery.held is not None:
            self.recovery.held.wrap_optimizer(self.optimizer)  # pruned entries back to 0 after every step
        return self.optimizer

    def inputs(self, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor | None) -> tuple:
        """The loss module's arguments on the engine's device (position ids only when data.packing made them)."""
        return (x.to(self.device), y.to(self.device)) + (() if pos is None else (pos.to(self.device),))

    def forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, n_targets: torch.Tensor, last: bool, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One micro-step: the summed loss of (x, y); its gradient divided by the global batch's target count
        `n_targets` is accumulated. Gradients are reduced over ranks on the `last` micro-step only."""
        sync = contextlib.nullcontext() if (last or not self.info.enabled) else self.train_model.no_sync()
        with sync:
            with self.autocast:
                loss = self.train_model(*self.inputs(x, y, pos))
            # DDP averages gradients over ranks; x world turns that into a sum over the global batch
            (loss * self.info.world / n_targets.clamp(min=1)).backward()
        return loss.detach().float().cpu()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        if max_norm <= 0:
            return None
        return torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable()], max_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, fn):
        """Run `fn(loss_model)` (an eval pass) in the engine's precision."""
        with self.autocast:
            return fn(self.loss_model)

    def save_checkpoint(self, root: Path, step: int, trainer_state: dict, config_yaml: str, keep: int) -> Path:
        """Called on rank 0 (on every rank for an engine that gathers_state first)."""
        extra = {}
        masks = self.recovery.mask_tensors() if self.recovery is not None else {}
        if masks:
            extra[ckpt.MASKS] = masks
        adapters = checkpoint_state(self.model, adapter_modules(self.model))  # sparse_ft's indices, ...
        if adapters:
            extra[ckpt.ADAPTERS] = adapters
        return ckpt.save_checkpoint(
            root, step, self.model, self.optimizer, trainer_state, config_yaml, keep, extra=extra or None
        )

    def load_checkpoint(self, path: Path) -> dict:
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        modules = adapter_modules(self.model)
        if any(m.checkpoint_state() for m in modules.values()):
            load_checkpoint_state(modules, ckpt.load_extra(path, ckpt.ADAPTERS))
        if self.recovery is not None and self.recovery.held is not None:
            ckpt.check_masks(path, self.recovery.mask_tensors())
        return state

    def save_final(self, path: Path, base_path: str, tokenizer) -> None:
        self.setup.final.write(self.model, path, base_path, tokenizer)
        self.save_final_extras(path)

    def save_final_extras(self, path: Path) -> None:
        rec = self.recovery
        if rec is not None and rec.manifest is not None and self.setup.full:
            write_sparse_manifest(path, self.model, rec.manifest, recovered_by=str(Path(path).parent))

    def count_params(self) -> tuple[int, int]:
        return count_params(self.model)

    def report(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). A quantized linear counts its logical out x in weights, not packed bytes."""

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total, skip = 0, set()
    for module in model.modules():
        if is_quantized_linear(module):
            total += module.in_features * module.out_features
            bias = getattr(module, "bias", None)
            total += bias.numel() if bias is not None else 0
            skip.update(id(p) for p in module.parameters())
    seen = set()
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return trainable, total
