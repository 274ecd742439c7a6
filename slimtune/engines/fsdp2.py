"""`engine.name=fsdp2`: torch's FSDP2 (`fully_shard`) per decoder layer, the loss module as the root.

Each decoder layer is one FSDP unit (its parameters sharded on dim 0 over the ranks, gathered for its forward
and backward); the loss module is the root unit, so the embedding, final norm and lm_head are gathered when
the loss runs, which is where the chunked loss reads the head's weight. Gradients are reduce-scattered
(averaged), so the same x world scaling as DDP gives a sum over the global batch; only the last micro-step
syncs. A quantized base (QLoRA) is sharded too: FSDP2 shards parameters, not buffers, so each quantized
linear's packed tensors (codes, scales, double-quant constants) are concatenated into one frozen uint8
Parameter (`packed_bytes`, the role bitsandbytes' `quant_storage` plays for FSDP1), gathered with its layer,
and a pre-forward hook re-views the gathered bytes as the named tensors the format reads.

Checkpoints keep slimtune's layout (safetensors + JSON) with full, unsharded tensors gathered to rank 0 and
the optimizer state keyed by parameter name (`torch.distributed.checkpoint.state_dict`, full_state_dict), so
a run saved on N processes resumes on any other number (same global batch). One process runs the same code
on a one-rank group.

GaLore / FRUGAL / DCT project whole matrices and 8-bit states quantize whole tensors, while FSDP2 hands each
rank a shard: they are refused with one line (config.py), as is optim.in_backward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.registry import ENGINES
from slimtune.formats import checkpoint as ckpt
from slimtune.engines.ddp import Engine, in_memory
from slimtune.engines.setup import EngineSetup


def one_rank_group() -> bool:
    """A one-process gloo group, so FSDP2 (which needs a process group) runs the same code without torchrun.
    True when this call created it (its engine destroys it on close)."""
    if tdist.is_initialized():
        return False
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    return True


def shardable_quant(model: nn.Module) -> int:
    """Every FrozenQuantLinear's buffers -> one frozen uint8 Parameter + views made before each forward.
    Returns the number of modules converted."""
    from slimtune.quant.linear import FrozenQuantLinear

    n = 0
    for m in model.modules():
        if not isinstance(m, FrozenQuantLinear) or not m._buffers:
            continue
        layout, chunks, off = [], [], 0
        for name, t in list(m._buffers.items()):
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
            layout.append((name, t.dtype, tuple(t.shape), off, raw.numel()))
            chunks.append(raw)
            off += raw.numel()
            del m._buffers[name]
        m.packed_bytes = nn.Parameter(torch.cat(chunks), requires_grad=False)
        m._packed_layout = layout
        _view_packed(m, ())
        m._packed_hook = m.register_forward_pre_hook(_view_packed)
        n += 1
    return n


def unshardable_quant(model: nn.Module) -> None:
    """Inverse of shardable_quant on full (gathered) bytes: each format's tensors as buffers again, for a save
    that reads them by name (a quantized checkpoint's final/)."""
    for m in model.modules():
        layout = getattr(m, "_packed_layout", None)
        if layout is None:
            continue
        flat = m.packed_bytes.detach()
        for name, dtype, shape, off, nbytes in layout:
            m.__dict__.pop(name, None)
            m.register_buffer(name, flat[off : off + nbytes].view(dtype).view(shape).clone())
        del m._parameters["packed_bytes"], m._packed_layout, m._packed_views
        m._packed_hook.remove()


def _view_packed(m: nn.Module, args) -> None:
    """The format's tensors as views of the (gathered) bytes; plain attributes, so not in state_dict."""
    flat = m.packed_bytes
    flat = flat.full_tensor() if hasattr(flat, "full_tensor") else flat  # sharded (outside forward): gather
    views = {
        name: flat[off : off + nbytes].view(dtype).view(shape) for name, dtype, shape, off, nbytes in m._packed_layout
    }
    m.__dict__.update(views)  # Int8Linear reads self.codes / self.absmax
    m._packed_views = views


def unshardable(model: nn.Module) -> set[nn.Parameter]:
    """Frozen parameters FSDP2 cannot shard, kept whole on every rank: bitsandbytes' Int8Params (its CB / SCB
    row scales live as attributes of the parameter, which turning it into a DTensor shard drops)."""
    from slimtune.quant.bnb import is_bnb_linear

    return {m.weight for m in model.modules() if is_bnb_linear(m) and type(m.weight).__name__ == "Int8Params"}


def full_parameters(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or every trainable one) as a full CPU tensor, by name: sharded ones gathered (a
    collective: every rank calls this, same order), whole ones as they are. Parameters only: a module's
    state_dict extras (bitsandbytes' SCB / weight_format) are not parameters and need no gathering."""
    out = {}
    for n, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
    return out


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise SlimtuneError(
            f"engine.name=fsdp2: {type(model).__name__} has no decoder `layers` list to shard; use engine.name=ddp"
        )
    return list(layers)


@ENGINES.register("fsdp2")
class FSDP2Engine(Engine):
    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"whole_matrices"}  # each rank holds a shard of every parameter

    @classmethod
    def validate(cls, cfg) -> None:
        in_memory(cfg)

    @classmethod
    def memory_terms(cls, cfg, model, s, world: int, device: str):
        """Parameters, gradients and optimizer state / W; the unsharded parameters of two decoder layers (the one
        computing and the one prefetched), the root unit (embedding, final norm, head: not resharded between
        forward and backward) and one layer's unsharded gradient."""
        s.frozen, s.trainable = -(-s.frozen // world), -(-s.trainable // world)
        s.grads, s.state = -(-s.grads // world), -(-s.state // world)
        s.engine = 2 * model.layer + model.root + model.layer_trainable
        return s

    sharded = True  # every rank must run each forward (eval batches are padded to the same count)
    gathers_state = True

    def __init__(self, model: nn.Module, setup: EngineSetup, device: torch.device, info, recovery=None):
        if recovery is not None and recovery.held is not None:
            raise SlimtuneError(
                "engine.name=fsdp2: full fine-tuning of a pruned base holds masks on whole weights, "
                "which FSDP2 shards; recover with adapter.type=lora, or engine.name=ddp"
            )
        self.own_group = not info.enabled and one_rank_group()
        super().__init__(model, setup, device, info, recovery, wrap=False)
        from torch.distributed.fsdp import fully_shard  # imported when used: ~45 MB for every command otherwise

        shardable_quant(model)
        whole = unshardable(model)
        for layer in decoder_layers(model):
            fully_shard(layer, ignored_params=whole)
        # the root: embedding, norm, head (read by the loss), loss modules
        fully_shard(self.train_model, ignored_params=whole)
        if self.train_model is not self.loss_model:  # eval's plain loss shares the root's parameters
            self.eval_model = self.loss_model
        self.root = self.train_model

    def forward_backward(self, x, y, n_targets, last: bool, pos=None) -> torch.Tensor:
        self.root.set_requires_gradient_sync(last)
        with self.autocast:
            loss = self.train_model(*self.inputs(x, y, pos))
        (loss * self.info.world / n_targets.clamp(min=1)).backward()
        return loss.detach().float().cpu()

    def clip_grad_norm(self, max_norm: float):
        norm = super().clip_grad_norm(max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def evaluate(self, fn):
        with self.autocast:
            return fn(self.root)  # through the root, so its parameters are gathered

    # ---------------------------------------------------------------- checkpoints: full tensors, by name

    def _full_state(self) -> tuple[dict, dict]:
        """(trainable weights, optimizer state keyed by name): collectives on every rank, tensors on rank 0."""
        weights = full_parameters(self.model, trainable_only=True)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        return weights, optim

    def save_checkpoint(self, root: Path, step: int, trainer_state: dict, config_yaml: str, keep: int) -> Path:
        weights, optim = self._full_state()
        target = Path(root) / f"step_{step}"
        if self.info.is_main:
            ckpt.save_state(root, step, weights, optim, trainer_state, config_yaml, keep)
        return target

    def load_checkpoint(self, path: Path) -> dict:
        weights, optim, state = ckpt.read_state(path)
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(weights) != names:
            diff = sorted(set(weights) ^ names)
            raise SlimtuneError(
                f"checkpoint {path} does not match the model (e.g. '{diff[0]}'); resume with the "
                "config it was written with (an engine.name=fsdp2 run resumes with fsdp2)"
            )
        try:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=StateDictOptions(full_state_dict=True))
        except (KeyError, ValueError, RuntimeError) as e:
            raise SlimtuneError(
                f"checkpoint {path}: its state does not match ({e}); same optim.name and engine needed"
            ) from None
        return state

    def save_final(self, path: Path, base_path: str, tokenizer) -> None:
        """The last use of the model: gathered on every rank (collectives), then on rank 0 each parameter is
        replaced by its full tensor and the usual final save runs."""
        full = full_parameters(self.model)
        if not self.info.is_main:
            return
        with torch.no_grad():
            for n, p in list(self.model.named_parameters()):
                mod, _, leaf = n.rpartition(".")
                owner = self.model.get_submodule(mod) if mod else self.model
                setattr(owner, leaf, nn.Parameter(full[n].to(self.device), requires_grad=p.requires_grad))
            unshardable_quant(self.model)
            for m in self.model.modules():
                for key, hook in list(m._state_dict_pre_hooks.items()):  # FSDP2's: would put the shards back
                    if getattr(hook, "__module__", "").startswith("torch.distributed.fsdp"):
                        del m._state_dict_pre_hooks[key]
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        self.setup.final.write(self.model, path, base_path, tokenizer)
        super().save_final_extras(path)

    def close(self) -> None:
        if self.own_group and tdist.is_initialized():
            tdist.destroy_process_group()
