"""A compressed checkpoint kept compressed in memory: `model.keep_compressed=true` (eval and generate).

The decoder layers' stored tensors stay as the file holds them (DFloat11 codes, bitmask / N:M patterns +
kept values, NF4 / INT8 blocks); their parameters hold no memory (a 0-d value expanded to the shape) until
the layer's forward: a pre-hook decodes the layer's tensors (the DFloat11-coded ones in one lockstep), the
forward runs, a hook drops them again. What stays resident: the encoded layers, the rest of the model
decoded (embedding, final norm, head) and one decoded layer at a time. The price: every forward decodes
every layer (on CPU the torch lockstep decoder: about as long as loading the checkpoint, per forward).
Inference only: training would have autograd keep each decoded weight for backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError
from slimtune.memory import trim_heap

KEPT_KINDS = ("df11", "df11f", "mask", "nm")  # what a layer keeps encoded ("raw" tensors are decoded as usual)


def _placeholder(shape, dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


class EncodedLayer:
    """One decoder layer's encoded tensors and the parameters they fill: decode() -> {name: tensor}."""

    def __init__(self, entries: dict, dtype):
        self.entries = entries  # qualified name -> (record, parts, module, attr)
        self.dtype = dtype

    def decode(self) -> dict[str, torch.Tensor]:
        from slimtune.compress.compressed import decode_coded, decode_tensor

        records = {n: record for n, (record, _, _, _) in self.entries.items()}
        out = decode_coded(records, {n: parts for n, (_, parts, _, _) in self.entries.items()})
        for n, (record, parts, _, _) in self.entries.items():
            if n not in out:
                out[n] = decode_tensor(n, record, parts)
        return out

    def decode_checked(self) -> dict[str, torch.Tensor]:
        try:
            return self.decode()
        except (ValueError, KeyError, RuntimeError) as e:
            raise SlimtuneError(f"model.keep_compressed=true: the tensors of {', '.join(list(self.entries)[:2])}... "
                                f"do not decode ({e}); the checkpoint is corrupted; export it again") from None

    def fill(self, module: nn.Module, inputs) -> None:
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            raise SlimtuneError("model.keep_compressed=true decodes each layer for its forward only; it is for "
                                "eval and generate, not training: drop model.keep_compressed")
        for n, t in self.decode_checked().items():
            _, _, owner, attr = self.entries[n]
            owner._parameters[attr].data = t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def empty(self, module: nn.Module, inputs, output) -> None:
        for record, _, owner, attr in self.entries.values():
            p = owner._parameters[attr]
            p.data = _placeholder(record["shape"], p.dtype)
        trim_heap()  # the decoded layer's pages go back to the OS, not into a heap that only grows


def split_layer_tensors(model: nn.Module, manifest: dict, grouped: dict) -> dict[str, dict]:
    """layer prefix ("model.layers.3.") -> {qualified name: (record, parts)} of the encoded tensors the
    layer owns (tied ones excluded: they are decoded once, with the rest of the model)."""
    from slimtune.compress.distill import decoder_layers

    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise SlimtuneError(f"model.keep_compressed=true: {e}") from None
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in layers]
    tied = {r["tied_to"] for r in manifest["tensors"].values() if "tied_to" in r}
    out: dict[str, dict] = {p: {} for p in prefixes}
    for name, record in manifest["tensors"].items():
        if "tied_to" in record or name in tied or record.get("kind") not in KEPT_KINDS:
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            out[prefix][name] = (record, grouped.get(name, {}))
    return out


def keep_layers_compressed(model: nn.Module, layers: dict[str, dict], dtype) -> None:
    """Install the placeholders and hooks of `layers` (split_layer_tensors) on `model`, whose other
    tensors are loaded."""
    for prefix, tensors in layers.items():
        if not tensors:
            continue
        layer = model.get_submodule(prefix.rstrip("."))
        entries = {}
        for name, (record, parts) in tensors.items():
            module_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(module_name)
            stored = getattr(torch, record["dtype"])
            p_dtype = dtype if dtype is not None and stored.is_floating_point else stored
            owner._parameters[attr] = nn.Parameter(_placeholder(record["shape"], p_dtype), requires_grad=False)
            entries[name] = (record, parts, owner, attr)
        encoded = EncodedLayer(entries, dtype)
        layer.register_forward_pre_hook(encoded.fill)
        layer.register_forward_hook(encoded.empty)
