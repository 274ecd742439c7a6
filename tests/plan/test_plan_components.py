"""Each planner component against an exact count on the tiny model, as the trainer's pipeline builds it:
parameter and buffer bytes of the built model (plain, NF4, packed NF3, full, sparse_ft), the optimizer's state
after a real step, and autograd's saved tensors of one micro-batch (saved_tensors_hooks)."""

import pytest
import torch

from plan_helpers import batch, build, model_bytes, saved_activation_bytes
from slimtune_testutil import TINY

from slimtune import config as C
from slimtune.optim import build_optimizer, optimizer_options
from slimtune.plan.activations import activations
from slimtune.plan.arch import architecture
from slimtune.plan.optimizer import state_bytes
from slimtune.plan.weights import model_weights
from slimtune.trainer.report import optimizer_state_bytes

# one token stream cut into blocks (the default packs documents: their worst case, a micro-batch with a
# document boundary, is tested below on its own); a schema without data.packing fails here, as a bug
STREAM = ["data.packing=stream"]
_BUILT: dict = {}


def _cfg(recipe: str, *extra: str):
    return C.load_config(recipe, TINY + STREAM + list(extra))


def _built(cfg):
    """One pipeline build per config for the whole module (weights and activations share them)."""
    if cfg not in _BUILT:
        _BUILT[cfg] = build(cfg)
    return _BUILT[cfg]


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("lora", ()),
        ("qlora", ()),  # NF4, double-quantized scales (int8 codes kept in 256-value blocks)
        ("qlora", ("quant.method=nf3", "quant.double_quant=false")),  # packed 3-bit codes, fp32 scales
        ("qlora", ("quant.method=int8",)),
        ("full", ()),
        ("sparse_ft", ()),
    ],
)
def test_weights_match_the_built_model(recipe, extra):
    cfg = _cfg(recipe, *extra)
    (built, _) = _built(cfg)
    frozen, trainable = model_bytes(built.model)
    w = model_weights(architecture(cfg.model.name), cfg)
    assert w.frozen_bytes + w.adapter_buffers == frozen  # (sparse_ft's regrowth statistics come with training)
    assert w.trainable_bytes == trainable
    assert sum(t.numel for t in w.trainable) == sum(p.numel() for p in built.model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "optim",
    [
        ("optim.name=adamw",),
        ("optim.name=adamw", "optim.state_bits=8"),
        ("optim.name=sgd", "sgd.momentum=0.9"),
        ("optim.name=galore", "galore.rank=8"),
        ("optim.name=galore", "galore.rank=8", "galore.proj_dtype=int8", "optim.state_bits=8", "galore.proj_type=left"),
        ("optim.name=dct", "dct.rank=8"),
        ("optim.name=frugal", "frugal.subspace=svd"),
        ("optim.name=frugal", "frugal.subspace=blocks"),
        ("optim.name=frugal", "frugal.subspace=coordinates"),
    ],
)
def test_optimizer_state_matches_a_real_step(optim):
    base = _cfg("full", "train.activation_checkpointing=false")
    built, blocks = _built(base)
    named = [(n, p) for n, p in built.model.named_parameters() if p.requires_grad]
    if named[0][1].grad is None:  # one backward gives every optimizer its gradients
        built.engine.forward_backward(*batch(blocks, 4)[:2], torch.tensor(252.0), True)
    cfg = _cfg("full", *optim)
    opt = build_optimizer(cfg.optim, named, 1e-4, optimizer_options(cfg))
    opt.step()
    w = model_weights(architecture(cfg.model.name), cfg)
    assert state_bytes(cfg, w.trainable) == optimizer_state_bytes(opt)


def test_lora_optimizer_state_matches_a_real_step():
    cfg = _cfg("lora")
    built, blocks = _built(cfg)
    opt = built.engine.make_optimizer()
    built.engine.forward_backward(*batch(blocks, 4)[:2], torch.tensor(252.0), True)
    built.engine.step()
    w = model_weights(architecture(cfg.model.name), cfg)
    assert state_bytes(cfg, w.trainable) == optimizer_state_bytes(opt) > 0


@pytest.mark.parametrize("recipe", ["lora", "qlora", "full", "qat", "qat_lora"])
@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_activations_match_autograds_saved_tensors(recipe, checkpointing):
    cfg = _cfg(recipe, f"train.activation_checkpointing={checkpointing}")
    built, blocks = _built(cfg)
    measured = saved_activation_bytes(built, batch(blocks, cfg.train.batch_size))
    arch = architecture(cfg.model.name)
    planned = activations(arch, cfg, model_weights(arch, cfg), "cpu")
    assert planned.saved == measured
    if checkpointing == "true":  # checkpointing keeps a fraction of the full count
        assert (
            planned.saved
            < activations(
                arch, _cfg(recipe, "train.activation_checkpointing=false"), model_weights(arch, cfg), "cpu"
            ).saved
            / 3
        )


def test_bf16_activations_count_the_autocast_copies():
    cfg = _cfg("lora", "model.dtype=bfloat16")
    built, blocks = _built(cfg)
    arch = architecture(cfg.model.name)
    planned = activations(arch, cfg, model_weights(arch, cfg), "cpu")
    assert planned.saved == saved_activation_bytes(built, batch(blocks, 4)) and planned.weight_copies > 0


def test_packed_documents_with_a_boundary_are_the_planned_worst_case():
    """Position ids per row and a 4-D mask: k, v repeated to every head, the mask saved per layer. The
    planner assumes B x (S - 1) targets; a boundary's ignored labels make the measured count a bit lower."""
    cfg = C.load_config("lora", TINY + ["data.packing=documents", "train.seq_len=256"])
    built, blocks = _built(cfg)
    args = batch(blocks, 4)
    assert len(args) == 3 and bool((args[2][:, 1:] == 0).any())
    measured = saved_activation_bytes(built, args)
    arch = architecture(cfg.model.name)
    planned = activations(arch, cfg, model_weights(arch, cfg), "cpu").saved
    ignored = int((args[1][:, 1:] == -100).sum())
    assert planned - ignored * (arch.hidden * 4 + 1) <= measured <= planned
    stream = activations(
        arch,
        C.load_config("lora", TINY + ["data.packing=stream", "train.seq_len=256"]),
        model_weights(arch, cfg),
        "cpu",
    ).saved
    assert measured > stream * 1.1  # the mask and the repeated k, v are real memory
