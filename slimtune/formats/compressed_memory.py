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


def _placeholder(shape, dtype, device="cpu") -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(tuple(shape))


class EncodedLayer:
    """One decoder layer's encoded tensors and the parameters they fill: decode() -> {name: tensor}, on
    `device` (`to`): on CUDA the DFloat11 bf16 codes live on the GPU and the Triton kernel decodes them there
    (kernels/dfloat11_decode.py); the other kinds decode on the host and are copied over."""

    def __init__(self, entries: dict, dtype):
        self.entries = entries  # qualified name -> (record, parts, module, attr)
        self.dtype = dtype
        self.device = torch.device("cpu")

    def _on_gpu(self, record: dict) -> bool:
        from slimtune.kernels.dispatch import use_triton

        return record["kind"] == "df11" and use_triton(torch.empty(0, device=self.device))

    def decode(self) -> dict[str, torch.Tensor]:
        from slimtune.formats.compressed import decode_coded, decode_tensor
        from slimtune.kernels.dfloat11_decode import dfloat11_decode

        on_gpu = {n for n, (record, _, _, _) in self.entries.items() if self._on_gpu(record)}
        out = {
            n: dfloat11_decode({**parts, "shape": record["shape"], "block_values": record["block_values"]}, self.device)
            for n, (record, parts, _, _) in self.entries.items()
            if n in on_gpu
        }
        host = {n: e for n, e in self.entries.items() if n not in on_gpu}
        decoded = decode_coded(
            {n: record for n, (record, _, _, _) in host.items()}, {n: parts for n, (_, parts, _, _) in host.items()}
        )
        for n, (record, parts, _, _) in host.items():
            t = decoded[n] if n in decoded else decode_tensor(n, record, parts)
            out[n] = t.to(self.device, non_blocking=True)
        return out

    def decode_checked(self) -> dict[str, torch.Tensor]:
        try:
            return self.decode()
        except (ValueError, KeyError, RuntimeError) as e:
            raise SlimtuneError(
                f"model.keep_compressed=true: the tensors of {', '.join(list(self.entries)[:2])}... "
                f"do not decode ({e}); the checkpoint is corrupted; export it again"
            ) from None

    def fill(self, module: nn.Module, inputs) -> None:
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            raise SlimtuneError(
                "model.keep_compressed=true decodes each layer for its forward only; it is for "
                "eval and generate, not training: drop model.keep_compressed"
            )
        for n, t in self.decode_checked().items():
            _, _, owner, attr = self.entries[n]
            owner._parameters[attr].data = t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def empty(self, module: nn.Module, inputs, output) -> None:
        for record, _, owner, attr in self.entries.values():
            p = owner._parameters[attr]
            p.data = _placeholder(record["shape"], p.dtype, self.device)
        trim_heap()  # the decoded layer's pages go back to the OS, not into a heap that only grows

    def detach_placeholders(self) -> None:
        """Take the placeholders out of their modules (a module's .to() would materialize them)."""
        for _, _, owner, attr in self.entries.values():
            owner._parameters[attr].data = torch.empty(0, dtype=owner._parameters[attr].dtype)

    def to(self, device: torch.device) -> None:
        """Decode on `device` from now on (its GPU-decoded codes moved there once); placeholders on it."""
        self.device = torch.device(device)
        for n, (record, parts, owner, attr) in self.entries.items():
            if self._on_gpu(record):
                moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in parts.items()}
                self.entries[n] = (record, moved, owner, attr)
        self.empty(None, None, None)


def to_device(model: nn.Module, device) -> nn.Module:
    """model.to(device), keeping a keep_compressed model's encoded layers encoded (their placeholders are not
    materialized on the device, and each layer then decodes there)."""
    layers = getattr(model, "encoded_layers", [])
    for layer in layers:
        layer.detach_placeholders()
    model.to(device)
    for layer in layers:
        layer.to(device)
    return model


def split_layer_tensors(model: nn.Module, manifest: dict, grouped: dict) -> dict[str, dict]:
    """layer prefix ("model.layers.3.") -> {qualified name: (record, parts)} of the encoded tensors the
    layer owns (tied ones excluded: they are decoded once, with the rest of the model)."""
    from slimtune.prune.distill import decoder_layers

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
        model.encoded_layers = [*getattr(model, "encoded_layers", []), encoded]  # compressed_memory.to_device
