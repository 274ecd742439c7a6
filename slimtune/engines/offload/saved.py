"""Keeping activations without keeping weights (offload.activations=keep).

Autograd saves, beside a layer's activations, views of its weights (`mm` keeps `weight.t()`, RMSNorm keeps
its weight). Those views point into a pooled slab that is reused as soon as the layer leaves memory after
its forward. Under bf16 autocast (no autocast cache) `mm` keeps a view of the weight's bf16 cast instead, a
fresh copy that would keep 2 bytes per parameter alive; a view of a cast of a streamed trained weight (found
through its grad_fn: ToCopyBackward0 -> AccumulateGrad of that weight) is saved the same way and cast again
at unpack (the same values bit for bit). `saved_tensors_hooks` replace such a view by a reference (unit,
parameter, view geometry) when it is saved; when backward unpacks it, the unit is loaded again (the units
below start loading too) and the same view is taken of the freshly read weights. Activations themselves are
saved as usual: backward runs without recomputing any layer, at the price of holding every layer's
activations in RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightRef:
    unit: str
    name: str
    size: tuple
    stride: tuple
    offset: int  # storage offset relative to the parameter's own view (to the cast's start for a cast)
    dtype: torch.dtype | None = None  # a view of the parameter cast to this dtype


class SavedWeights:
    """pack/unpack for torch.autograd.graph.saved_tensors_hooks. views(): unit -> {name: view} of the units
    in memory now (kept by the streamer); enter(unit): load `unit` for backward and return its views."""

    def __init__(self, views, enter):
        self.views, self.enter = views, enter
        self.kept = 0  # references packed (a test and report figure: weights not held by autograd)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        if t.numel() == 0:
            return t
        ptr = t.data_ptr()
        for unit, views in self.views().items():
            for name, v in views.items():
                start = v.data_ptr()
                if start <= ptr < start + v.numel() * v.element_size() and t.dtype == v.dtype and t.device == v.device:
                    self.kept += 1
                    return WeightRef(
                        unit, name, tuple(t.size()), tuple(t.stride()), t.storage_offset() - v.storage_offset()
                    )
        return self._pack_cast(t)

    def _pack_cast(self, t: torch.Tensor):
        """A view of `weight.to(dtype)` (autocast's cast of a trained weight) -> a reference, else t."""
        base = t if t._base is None else t._base
        fn = base.grad_fn
        if fn is None or type(fn).__name__ != "ToCopyBackward0" or not base.is_contiguous() or base.storage_offset():
            return t
        src = fn.next_functions[0][0] if fn.next_functions else None
        w = getattr(src, "variable", None)  # AccumulateGrad of a leaf parameter
        if w is None or w.shape != base.shape or w.device != t.device:
            return t
        for unit, views in self.views().items():
            for name, v in views.items():
                if v.data_ptr() == w.data_ptr() and v.shape == w.shape and v.is_contiguous():
                    self.kept += 1
                    return WeightRef(unit, name, tuple(t.size()), tuple(t.stride()), t.storage_offset(), t.dtype)
        return t

    def unpack(self, saved):
        if not isinstance(saved, WeightRef):
            return saved
        v = self.enter(saved.unit)[saved.name]
        if saved.dtype is not None:
            return v.to(saved.dtype).as_strided(saved.size, saved.stride, saved.offset)
        return v.as_strided(saved.size, saved.stride, v.storage_offset() + saved.offset)
