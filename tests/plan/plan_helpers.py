"""Independent references for the planner tests: the tensors of a model built by the trainer's pipeline,
the optimizer's state after a real step, and autograd's saved tensors of one micro-batch."""

from __future__ import annotations

import torch
import torch.nn as nn


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared tensors once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) bytes of a model's parameters and buffers, each storage once."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    keys = {storage_key(p) for p in trainable}
    frozen = [t for t in [*model.parameters(), *model.buffers()] if storage_key(t) not in keys]
    return storage_bytes(frozen), storage_bytes(trainable)


_DATA: dict = {}


def _data(cfg):
    """The run's data splits, tokenized once per (model, data section, seq_len)."""
    from slimtune import data as D
    from slimtune.formats.hf import load_tokenizer

    key = (cfg.model.name, cfg.data, cfg.train.seq_len)
    if key not in _DATA:
        tok = load_tokenizer(cfg.model.name)
        _DATA[key] = D.splits_for(cfg, tok)
    return _DATA[key]


def build(cfg):
    """(built model and engine, train blocks) as the trainer builds them for cfg on CPU."""
    from slimtune.model.pipeline import build_model

    torch.manual_seed(cfg.train.seed)
    data = _data(cfg)
    built = build_model(cfg, torch.device("cpu"), train_blocks=data.train, log=lambda s: None)
    return built, data.train


def batch(blocks, n: int) -> tuple:
    """The loss module's arguments for n blocks, as the loop passes them: (x, y) or (x, y, position ids).
    With packed documents, blocks holding a document boundary are taken (the planner's worst case: a mask)."""
    pos = getattr(blocks, "position_ids", None)
    if pos is None:
        idx = torch.arange(n)
    else:
        restarts = (pos[:, 1:] <= 0).any(1)
        idx = torch.cat([torch.nonzero(restarts).flatten(), torch.nonzero(~restarts).flatten()])[:n]
    out = (blocks.input_ids[idx].clone(), blocks.labels[idx].clone())
    return out if pos is None else out + (pos[idx].clone(),)


def saved_activation_bytes(built, args: tuple) -> int:
    """Bytes autograd holds at the end of one forward of the loss module on `args`: the storages saved for
    backward (the model's parameters and buffers excluded), plus the tensor arguments activation checkpointing
    keeps for each decoder layer's recompute (held by checkpoint's closure, not through saved-tensor hooks).
    Runs backward afterwards."""
    model, engine = built.model, built.engine
    model.train()  # as the loop trains (transformers checkpoints layers in training mode only)
    own = {storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta" and storage_key(t) not in own:
            saved[storage_key(t)] = t.untyped_storage().nbytes()
        return t

    handles = []
    if engine.setup.train.activation_checkpointing:

        def keep_input(module, args, kwargs):
            for a in [*args, *kwargs.values()]:
                for t in a if isinstance(a, tuple) else (a,):
                    if isinstance(t, torch.Tensor) and t.dtype != torch.int64 and storage_key(t) not in own:
                        saved[storage_key(t)] = t.untyped_storage().nbytes()

        for layer in model.get_decoder().layers:
            handles.append(layer.register_forward_pre_hook(keep_input, with_kwargs=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), engine.autocast:
            loss = engine.train_model(*args)
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    return sum(saved.values())


def optimizer_after_step(built, args: tuple):
    """The engine's optimizer after one real step on `args`."""
    opt = built.engine.make_optimizer()
    built.model.train()
    x, y = args[0], args[1]
    built.engine.forward_backward(x, y, torch.tensor(float(y[:, 1:].numel())), True, *args[2:])
    built.engine.step()
    return opt
