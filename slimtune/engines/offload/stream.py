"""Layer streaming: forward hooks load a unit's weights into pooled slabs just before its module runs (the
next `prefetch` units already on their way), and release them after; backward recomputes each layer
(activation checkpointing), which loads it again in reverse order; when the last gradient of a unit's
trainable parameters has arrived, its update is queued on a worker thread (Fuyou: the optimizer step
overlaps the backward of the layers below), and no full-model gradient ever exists.

With gradient clipping, or on the micro-steps before the last of an accumulation, a finished unit's
gradient goes to the store (`<unit>~grad`, added to what is there) instead, and `finish_step` runs the
updates once the global norm is known: clipping keeps its exact meaning at the price of writing and
reading the gradients once more (4 + 4 bytes per parameter and step).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slimtune.engines.offload.device import DeviceMirror, synchronize
from slimtune.engines.offload.gradients import StreamedGradients
from slimtune.engines.offload.pool import BufferPool, Slab
from slimtune.engines.offload.saved import SavedWeights
from slimtune.engines.offload.store import ALIGN, UnitStore
from slimtune.engines.offload.units import Unit, Use, placeholder
from slimtune.engines.offload.update import UnitOptimizer
from slimtune.engines.offload.worker import Restore, Worker


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@dataclass
class Loaded:
    slab: Slab | None
    views: dict[str, torch.Tensor]  # what the parameters point at (device copies with a mirror)
    futures: list = field(default_factory=list)
    ready: bool = False
    host: dict[str, torch.Tensor] | None = None  # with a mirror: the host slab's views (master weights)
    device_buf: torch.Tensor | None = None
    event: object = None  # with a mirror on CUDA: the upload's


class Streamer(StreamedGradients):
    """Owns which units are in memory. units: forward order; streamed: unit -> {param name: "frozen" |
    "train"} for the parameters whose weights live in the store (the rest stay resident)."""

    def __init__(
        self,
        units: list[Unit],
        uses: list[Use],
        store: UnitStore,
        pool: BufferPool,
        streamed: dict[str, dict[str, str]],
        prefetch: int,
        optimizer: UnitOptimizer | None,
        trained: dict[str, list[str]],
        store_names: dict[str, str],
        mirror: DeviceMirror | None = None,
    ):
        self.units = {u.name: u for u in units}
        self.order = [u.name for u in units if streamed.get(u.name)]
        self.uses, self.store, self.pool = uses, store, pool
        self.streamed, self.prefetch, self.optimizer = streamed, prefetch, optimizer
        self.trained = trained  # unit -> trainable params whose state is in the store (updated per unit)
        self.store_names = store_names  # param name -> its name in the store (written before adapters renamed it)
        self.loaded: dict[str, Loaded] = {}
        self.loading: dict[str, threading.Event] = {}  # unit -> set once its load entry exists
        self.commits: dict = {}  # unit -> future of its new version's commit (+ release)
        self.wait_seconds = 0.0  # the main thread blocked on reads and updates (I/O not hidden by compute)
        self.reduce = None  # reduce(grads): the gradients over ranks (torchrun), before a unit's update
        self.lock = threading.RLock()
        self.hooks = []
        self.waiting: dict[str, set[str]] = {}  # unit -> trainable params still without their gradient
        self.accumulate = False  # set per micro-step: gradients to the store instead of an update
        self.defer = False  # clipping: every update waits for finish_step
        self.norms: dict[str, torch.Tensor] = {}  # param -> its gradient's 2-norm (clipping)
        self.with_grad_store: set[str] = set()  # units whose ~grad holds a partial sum
        self.worker = Worker()
        self.saved = SavedWeights(self._ready_views, self._backward_load)  # offload.activations=keep
        self.mirror = mirror  # compute on an accelerator: units copied there, updates on the host copy
        self.device = mirror.device if mirror is not None else torch.device("cpu")
        self.placeholder = {}  # name of every streamed tensor -> (shape, dtype)
        for u, names in streamed.items():
            for n in names:
                t = self._get(u, n)
                self.placeholder[n] = (tuple(t.shape), t.dtype)
                self._set(u, n, self._placeholder(n))
        # with a mirror, trained parameters kept in memory (the resident unit's) have their master copy on the
        # host, where updates run; the parameter itself is the compute copy on the device
        self.host_master: dict[str, nn.Parameter] = {}
        if mirror is not None:
            for unit, names in trained.items():
                for n in names:
                    if n not in self.placeholder:
                        p = self.units[unit].params[n]
                        self.host_master[n] = nn.Parameter(p.data, requires_grad=True)
                        p.data = mirror.to_device(p.data)

    def _placeholder(self, name: str) -> torch.Tensor:
        return placeholder(*self.placeholder[name], device=self.device)

    def _get(self, unit: str, name: str) -> torch.Tensor:
        u = self.units[unit]
        if name in u.params:
            return u.params[name]
        module, attr = u.buffers[name]
        return module._buffers[attr]

    def _set(self, unit: str, name: str, value: torch.Tensor) -> None:
        """Point a streamed parameter (its .data) or buffer (a quantized base's codes) at `value`."""
        u = self.units[unit]
        if name in u.params:
            u.params[name].data = value
        else:
            module, attr = u.buffers[name]
            module._buffers[attr] = value

    # ------------------------------------------------------------------ slabs and loading

    def slab_class(self, unit: str) -> str:
        return "big" if unit in ("embed", "head") else "layer"

    def unit_bytes(self, unit: str) -> int:
        return sum(_align(_nbytes(*self.placeholder[n])) for n in self.streamed.get(unit, {}))

    def start_load(self, unit: str, wait: bool = True) -> None:
        """Begin reading `unit`'s weights (no-op if loaded or loading). The slab is taken outside the lock:
        waiting for one must not stop the worker from releasing another. wait=False (a prefetch): skip if
        no slab is free or the unit's update is still pending, rather than block."""
        with self.lock:
            if unit in self.loaded or unit in self.loading or not self.streamed.get(unit):
                return
            commit = self.commits.get(unit)
            if not wait and (self.worker.is_pending(unit) or (commit is not None and not commit.done())):
                return
            slab = None if wait else self.pool.try_acquire(self.slab_class(unit))
            if not wait and slab is None:
                return
            self.loading[unit] = threading.Event()
        try:
            self.worker.wait_for(unit)  # its pending update must be on disk first
            self.wait_commit(unit)
            slab = slab or self.pool.acquire(self.slab_class(unit))
            views, futures, offset = {}, [], 0
            for name, where in self.streamed[unit].items():
                shape, dtype = self.placeholder[name]
                views[name] = slab.view(offset, dtype, shape)
                offset += _align(views[name].numel() * views[name].element_size())
                store_unit = f"{unit}~frozen" if where == "frozen" else unit
                futures.append(self.store.read(store_unit, self.store_names.get(name, name), views[name]))
            with self.lock:
                self.loaded[unit] = Loaded(slab, views, futures)
        finally:
            with self.lock:
                self.loading.pop(unit).set()

    def ensure(self, unit: str) -> None:
        """`unit`'s weights in its parameters (waiting for their reads, or for another thread's load); on the
        training thread, a queued update of the unit (clipping's, from the step before) is done and
        committed first, so what is read is its new version."""
        if threading.current_thread() is threading.main_thread() and (
            self.worker.is_pending(unit) or unit in self.commits
        ):
            t0 = time.perf_counter()
            self.worker.wait_for(unit)
            self.wait_commit(unit)
            self.wait_seconds += time.perf_counter() - t0
        self.start_load(unit)
        with self.lock:
            started = self.loading.get(unit)
        if started is not None:
            started.wait()
        with self.lock:
            entry = self.loaded.get(unit)
        if entry is None:
            if self.streamed.get(unit):
                raise RuntimeError(f"offload: unit {unit} was released while it was needed")  # a bug if reached
            return
        if entry.ready:
            return
        t0 = time.perf_counter()
        for f in entry.futures:
            f.result()
        if threading.current_thread() is threading.main_thread():
            self.wait_seconds += time.perf_counter() - t0
        with self.lock:
            if not entry.ready:
                if self.mirror is not None:  # the compute copy, on the copy stream; compute waits for it only
                    entry.host = entry.views
                    entry.device_buf, entry.views, entry.event = self.mirror.upload(self.slab_class(unit), entry.host)
                    self.mirror.wait(entry.event)
                for name, view in entry.views.items():
                    self._set(unit, name, view)
                entry.ready = True

    def release(self, unit: str) -> None:
        with self.lock:
            entry = self.loaded.pop(unit, None)
        if entry is None:
            return
        try:
            for f in entry.futures:
                f.result()
        finally:  # a failed read is done too: the slab goes back either way
            for name in entry.views:
                self._set(unit, name, self._placeholder(name))
            if entry.device_buf is not None:
                synchronize(entry.event)  # the upload has read the host slab
                self.mirror.release(self.slab_class(unit), entry.device_buf)
            self.pool.release(entry.slab)

    def wait_commit(self, unit: str) -> None:
        f = self.commits.pop(unit, None)
        if f is not None:
            f.result()

    def drain(self) -> None:
        """Every queued update done and committed (errors of either surface here)."""
        t0 = time.perf_counter()
        self.worker.drain()
        for unit in list(self.commits):
            self.wait_commit(unit)
        self.wait_seconds += time.perf_counter() - t0

    def release_all(self) -> None:
        self.drain()
        for unit in list(self.loaded):
            self.release(unit)

    def close(self) -> None:
        """Stop the update thread and let every unit go, after a finished run or an error alike: queued updates
        are dropped, the running one finishes, errors are not raised (a failed run's has surfaced already)."""
        self.worker.stopping = True
        self._release_quietly()  # a running update may wait for a slab
        self.worker.close()
        for unit in list(self.commits):
            with contextlib.suppress(Exception):
                self.wait_commit(unit)
        self._release_quietly()
        self.detach()

    def _release_quietly(self) -> None:
        for unit in list(self.loaded):
            with contextlib.suppress(Exception):
                self.release(unit)

    # ------------------------------------------------------------------ hooks

    def attach(self) -> None:
        """Hooks on every module that uses streamed weights. A decoder layer's forward is also wrapped in
        activation checkpointing here, with the load inside the checkpointed function: the recompute in
        backward must load the layer again, and module hooks (outside the checkpoint) do not run then."""
        by_module: dict[int, list[Use]] = {}
        for use in self.uses:
            by_module.setdefault(id(use.module), []).append(use)
        for use in self.uses:
            if by_module.get(id(use.module)) is None:
                continue
            uses = by_module.pop(id(use.module))
            module = use.module
            if any(u.recompute for u in uses):
                self.hooks.append(Restore(module, "forward", module.forward))
                module.forward = self._checkpointed(module, module.forward, uses)
            else:
                self.hooks.append(module.register_forward_pre_hook(self._pre(uses)))
            self.hooks.append(module.register_forward_hook(self._post(uses)))
        for unit, names in self.trained.items():
            for n in names:
                p = self.units[unit].params[n]
                self.hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(unit, n)))

    def detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _checkpointed(self, module: nn.Module, forward, uses: list[Use]):
        def run(*args, **kwargs):
            self._enter(uses)
            return forward(*args, **kwargs)

        def wrapped(*args, **kwargs):
            if module.training and torch.is_grad_enabled():
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        return wrapped

    def _pre(self, uses: list[Use]):
        def hook(module, args):
            self._enter(uses)

        return hook

    def _enter(self, uses: list[Use]) -> None:
        """Before a module computes: its units loaded, the next ones on their way (the previous ones in
        backward, where the units backward has passed are let go)."""
        backward = in_backward()
        for use in uses:
            if backward:
                self._release_passed(use.unit)
            self.ensure(use.unit)
            self._prefetch_from(use.unit, reverse=backward)

    def _ready_views(self) -> dict[str, dict[str, torch.Tensor]]:
        with self.lock:
            return {u: e.views for u, e in self.loaded.items() if e.ready}

    def _backward_load(self, unit: str) -> dict[str, torch.Tensor]:
        """Backward reads `unit`'s saved weights (activations kept): load it, as a recompute would."""
        self._release_passed(unit)
        self.ensure(unit)
        self._prefetch_from(unit, reverse=True)
        with self.lock:
            return self.loaded[unit].views

    def _post(self, uses: list[Use]):
        def hook(module, args, out):
            if in_backward():
                return  # a recompute: backward needs the weights, the update releases them
            grad = torch.is_grad_enabled()
            for use in uses:
                keep = grad and (not use.release_after_forward or self._kept_for_backward(use.unit))
                if not keep:
                    self.release(use.unit)

        return hook

    def _kept_for_backward(self, unit: str) -> bool:
        """The last `prefetch` streamed units stay loaded after a training forward: backward starts there."""
        if unit not in self.order:
            return True
        i = self.order.index(unit)
        return i >= len(self.order) - self.prefetch

    def _prefetch_from(self, unit: str, reverse: bool) -> None:
        if unit not in self.order:
            return
        i = self.order.index(unit)
        ahead = (
            self.order[max(0, i - self.prefetch) : i][::-1] if reverse else self.order[i + 1 : i + 1 + self.prefetch]
        )
        for u in ahead:
            if u not in self.loaded:
                self.start_load(u, wait=False)

    def load_for(self, module: nn.Module) -> None:
        """Load what `module` needs when its weights are read without calling it (the loss reads the head's
        weight directly); they stay until the unit's update, or the step's end."""
        for use in self.uses:
            if use.module is module:
                self.ensure(use.unit)

    def _release_passed(self, unit: str) -> None:
        """In backward, entering `unit` means every later unit's backward is done (autograd runs the nodes
        of later layers first): release those that no update will release (frozen, streamed weights)."""
        if unit not in self.order:
            return
        i = self.order.index(unit)
        for later in self.order[i + 1 :]:
            if later in self.loaded and not self._released_by_update(later):
                self.release(later)

    def _released_by_update(self, unit: str) -> bool:
        """A unit whose streamed weights all train leaves memory after its update (its last gradient means
        its backward is over); one with frozen weights only when backward has passed it (a frozen norm's
        backward may come after the last LoRA factor's gradient)."""
        names = self.streamed.get(unit, {})
        return bool(self.trained.get(unit)) and all(w == "train" for w in names.values())


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()
