"""How a causal LM is cut into units: the input embedding, each decoder layer, the output head (unless
tied to the embedding), and what is left (final norm, small extras) in one resident unit.

Each parameter belongs to exactly one unit. `uses` lists, in forward order, the modules whose forward needs
a unit's weights and whether they may leave memory right after that forward:
  embedding  yes: its backward needs no weight values
  layers     yes: their backward recomputes them (activation checkpointing), which loads them again, or
             (activations kept) reads the saved weights through the streamer's saved-tensor hooks, which
             load them again
  lm_head    no: the loss may keep the weight for its backward; it goes after the unit's update (a tied
             head is the embedding's unit, loaded again at the end of forward)
The resident unit (final norm, ...) never leaves memory: its backward needs its values and it is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError


@dataclass
class Unit:
    name: str  # "embed", "layer.3", "head", "resident"
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # qualified name -> parameter
    buffers: dict[str, tuple] = field(default_factory=dict)  # qualified name -> (module, attr): streamed codes

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.params.items() if p.requires_grad}

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


@dataclass(frozen=True)
class Use:
    module: nn.Module
    unit: str
    release_after_forward: bool
    recompute: bool = False  # a decoder layer: backward runs its forward again (activation checkpointing)


def _parts(model: nn.Module):
    try:
        embed, decoder, head = model.get_input_embeddings(), model.get_decoder(), model.get_output_embeddings()
        layers = list(decoder.layers)
    except (AttributeError, TypeError, NotImplementedError):
        layers = None
    if layers is None or embed is None or head is None:
        raise SlimtuneError(
            f"offload: {type(model).__name__} does not expose input embeddings, decoder layers "
            "and an output head; engine.name=offload needs a decoder-only causal LM"
        )
    return embed, layers, head


def split_units(model: nn.Module, buffers: set[str] = frozenset()) -> list[Unit]:
    """Units in forward order (embed, layer.0 .. layer.N-1, head, resident), each with its parameters and
    the named `buffers` its modules hold (a quantized base's codes and scales, streamed like weights)."""
    embed, layers, head = _parts(model)
    order = [("embed", embed), *((f"layer.{i}", m) for i, m in enumerate(layers)), ("head", head)]
    owner: dict[int, str] = {}
    for name, module in order:
        for p in module.parameters():
            owner.setdefault(id(p), name)
    units = {name: Unit(name) for name, _ in order}
    units["resident"] = Unit("resident")
    seen = set()
    for qname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        units[owner.get(id(p), "resident")].params[qname] = p
    if buffers:
        inside = {id(m): name for name, module in order for m in module.modules()}
        for mod_name, mod in model.named_modules():
            for attr in mod._buffers:
                qname = f"{mod_name}.{attr}" if mod_name else attr
                if qname in buffers:
                    units[inside.get(id(mod), "resident")].buffers[qname] = (mod, attr)
    return [u for u in units.values() if u.params or u.buffers]


def uses(model: nn.Module, units: list[Unit], recompute: bool = True) -> list[Use]:
    """The modules that need a non-resident unit's weights, in forward order (recompute: decoder layers
    run again in backward)."""
    embed, layers, head = _parts(model)
    unit_of = {id(p): u.name for u in units for p in u.params.values()}
    out = []
    for module, release, again in [(embed, True, False), *((m, True, recompute) for m in layers), (head, False, False)]:
        names = {unit_of[id(p)] for p in module.parameters()}
        for name in sorted(names - {"resident"}):
            out.append(Use(module, name, release, again))
    return out


def placeholder(shape: tuple, dtype, device=None) -> "torch.Tensor":
    """What an unloaded parameter holds: its shape (numel, grads and autograd's shape checks all work) over
    one zero element (no memory; a stray read gives zeros, but every use is behind a load hook)."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def materialize(model: nn.Module, values: dict, dtype) -> None:
    """Replace every meta parameter of `model` by a CPU one: values[name] where given (resident weights),
    else a placeholder of `dtype`. Tied parameters stay tied; requires_grad is kept."""
    new: dict[int, nn.Parameter] = {}
    names = {}
    for qname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), qname)
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in new:
                qname = names[id(p)]
                data = values[qname] if qname in values else placeholder(tuple(p.shape), dtype)
                new[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            module._parameters[attr] = new[id(p)]


def resident_to(model: nn.Module, device: torch.device) -> None:
    """Every parameter and buffer still on the host (what no unit streams) moved to `device`, in place."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.device.type == "cpu":
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and b.device.type == "cpu":
                module._buffers[name] = b.to(device)
