"""Pruning a whole model in place: layer-sequential calibration and pruning (`slimtune prune` is
model/commands.py; the pruned dir it writes, formats/pruned.py).

Every nn.Linear inside the decoder layers is pruned (embeddings, norms and lm_head stay dense). The
calibration is layer-sequential, as in SparseGPT's and Wanda's code: the samples' hidden states at the
input of layer 0 are captured once, then for each layer i the statistics of its linears' inputs are
collected in one pass of the dense layer, all its linears are pruned, and the pruned layer is run
again to give layer i+1 its inputs. So each layer is calibrated on what the already-pruned layers below
produce, and only one layer's statistics exist at a time.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from slimtune.calibration import sample_inputs
from slimtune.prune.patterns import parse_pattern, pattern_name
from slimtune.registry import PRUNE_METHODS
from slimtune.errors import SlimtuneError


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the decoder layers (`model.get_decoder().layers`)."""
    layers = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is layers:
            return name, layers
    raise SlimtuneError("cannot find the decoder layers in the model")


def _layer_linears(layer: nn.Module) -> list[str]:
    return [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def prunable_linears(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear in the decoder layers, layer by layer."""
    prefix, layers = _decoder_layers(model)
    return [f"{prefix}.{i}.{name}" for i, layer in enumerate(layers) for name in _layer_linears(layer)]


class _Captured(Exception):
    """Raised by the pre-hook on layer 0 to stop the forward once its inputs are caught."""


def capture_layer_inputs(model: nn.Module, samples) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) at the input of decoder layer 0 for each sample: the kwargs are whatever
    the decoder passes the layer (transformers 5 Llama: attention_mask, position_embeddings = (cos, sin),
    position_ids, cache, use_cache, ...) so that each layer can be called alone with them."""
    _, layers = _decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    caught: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in samples:
            ids, kwargs = sample_inputs(sample)
            try:
                model.get_decoder()(
                    input_ids=ids.to(device), use_cache=False, **{k: v.to(device) for k, v in kwargs.items()}
                )
            except _Captured:
                pass
    finally:
        handle.remove()
    return caught


def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)  # transformers 4 layers return tuples
    return outs


def _collect_stats(
    layer: nn.Module, names: list[str], inputs: list[tuple[torch.Tensor, dict]], statistic: str
) -> dict[str, torch.Tensor]:
    """One pass of `layer` on `inputs`; name (within the layer) -> fp32 statistic of that linear's input:
    "sq_norms": sum over tokens of x_j^2 (in,); "hessian": H = 2 X X^T / n (in, in), accumulated as the
    SparseGPT reference does (H *= n / (n + b); H += 2 / (n + b) x x^T, n counting sequences)."""
    stats: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            b = x.shape[0] if x.dim() == 3 else 1
            x = x.reshape(-1, x.shape[-1]).float()
            if statistic == "sq_norms":
                stats[name] = stats.get(name, 0) + x.square().sum(dim=0)
                return
            n = seen.get(name, 0)
            H = stats.get(name)
            H = torch.zeros(x.shape[1], x.shape[1], device=x.device) if H is None else H * (n / (n + b))
            stats[name] = H + (2 / (n + b)) * (x.T @ x)
            seen[name] = n + b

        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        _run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def prune_model(
    model: nn.Module,
    samples,
    method: str,
    sparsity: float,
    pattern="unstructured",
    scope: str = "row",
    options=None,
    log=print,
) -> dict[str, float]:
    """Prune every linear of the decoder layers in place; returns name -> achieved sparsity (fraction of
    zeros). `samples`: input_ids tensors (1, T) or (N, T), or calibration_samples' (input_ids, labels,
    position_ids) (position ids as data.packing made them: no attention across packed documents), on any device;
    unused by magnitude. `pattern`: 'unstructured', 'n:m' (or parse_pattern's other forms). `options`: the
    method's own section (sparsegpt.*), or None for its defaults."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"prune method {method!r}: expected one of {', '.join(PRUNE_METHODS)}")
    pruner, nm = PRUNE_METHODS[method], parse_pattern(pattern)
    prefix, layers = _decoder_layers(model)
    if pruner.statistic is not None and not samples:
        raise SlimtuneError(f"prune method {method!r} needs calibration samples; got none")
    was_training = model.training
    model.eval()
    achieved: dict[str, float] = {}
    try:
        inputs = capture_layer_inputs(model, samples) if pruner.statistic is not None else []
        for i, layer in enumerate(layers):
            start = time.perf_counter()
            names = _layer_linears(layer)
            stats = _collect_stats(layer, names, inputs, pruner.statistic) if inputs else {}
            for name in names:
                linear, full = layer.get_submodule(name), f"{prefix}.{i}.{name}"
                stat = stats.pop(name, None)
                if pruner.statistic is not None and stat is None:
                    raise SlimtuneError(f"prune: {full} got no input during calibration; {method} needs its statistics")
                pruner.prune(linear.weight.data, stat, sparsity, nm, scope, options)
                achieved[full] = (linear.weight == 0).float().mean().item()
            del stats
            if inputs and i + 1 < len(layers):
                outs = _run_layer(layer, inputs)  # the pruned layer feeds the next one
                inputs = [(h, kwargs) for h, (_, kwargs) in zip(outs, inputs)]
            mean = sum(achieved[f"{prefix}.{i}.{n}"] for n in names) / max(len(names), 1)
            log(
                f"prune layer {i}/{len(layers)}: {method} {pattern_name(nm)} sparsity {mean:.3f} "
                f"({time.perf_counter() - start:.1f}s)"
            )
    finally:
        model.train(was_training)
    return achieved
