"""The streamer's gradient half (a mixin of stream.Streamer): each trained parameter's gradient hook counts
what its unit still waits for; when the last has arrived the unit's update is queued on the update thread,
or (clipping, accumulation) its gradient goes to the store's `<unit>~grad` for `deferred_updates`."""

from __future__ import annotations

import torch
from torch import nn

from slimtune.engines.offload.device import synchronize


class StreamedGradients:
    """Needs the Streamer's units, trained, store, mirror, worker, optimizer, lock, loaded, host_master,
    commits, with_grad_store, reduce, norms, order, streamed and its ensure / release / _prefetch_from /
    _released_by_update."""

    def begin_backward(self, accumulate: bool, defer: bool) -> None:
        self.accumulate, self.defer = accumulate, defer
        self.waiting = {u: set(names) for u, names in self.trained.items() if names}

    def _grad_hook(self, unit: str, name: str):
        def hook(p: torch.Tensor) -> None:
            pending = self.waiting.get(unit)
            if pending is None or name not in pending:
                return
            pending.discard(name)
            if not pending:
                self._unit_ready(unit)

        return hook

    def _unit_ready(self, unit: str) -> None:
        params = {n: self.units[unit].params[n] for n in self.trained[unit]}
        grads = {}
        for n, p in params.items():
            grads[n], p.grad = p.grad, None
        ready = None
        if self.mirror is not None:  # to pinned host memory on the copy stream; updates run on the host
            grads, ready = self.mirror.download(grads)
            if unit in self.with_grad_store or self.accumulate or self.defer or self.reduce is not None:
                synchronize(ready)  # read on this thread below
                ready = None
        if unit in self.with_grad_store:  # the earlier micro-steps' sum (g1 + g2 == g2 + g1 exactly)
            self.worker.wait_for(unit)  # its write, queued on the update thread
            for n, g in grads.items():
                old = torch.empty_like(g)
                self.store.read(f"{unit}~grad", n, old).result()
                g.add_(old)
        if not self.accumulate and self.reduce is not None:
            self.reduce(list(grads.values()))  # under torchrun: every rank's sum, as DDP's last micro-step
        if self.accumulate or self.defer:
            if not self.accumulate:
                for n, g in grads.items():
                    self.norms[n] = torch.linalg.vector_norm(g, 2.0)
            # written on the update thread (in order, before any update that reads it), while backward goes on
            self.worker.submit(unit, lambda: self.store.write_all(f"{unit}~grad", grads))
            self.with_grad_store.add(unit)
            if self._released_by_update(unit):
                self.release(unit)
            return
        self.with_grad_store.discard(unit)
        self.worker.submit(unit, lambda: (synchronize(ready), self._update(unit, params, grads)))

    def _update(self, unit: str, params: dict, grads: dict, lr: float | None = None, keep: bool = False) -> None:
        """Update, then commit on the store's commit thread: the next unit's update need not wait for these
        writes. The weights' slab is released once they are written, unless `keep` (a clipped update, run
        ahead of the next forward: the forward finds the new weights loaded instead of reading them again)
        and another slab of its class is free: the update thread never holds the last one, so neither a
        forward nor the next update can wait on a slab only a later forward would release."""
        self.ensure(unit)
        params = self._host_params(unit, params)
        writer = self.optimizer.step(self.store, unit, params, grads, write_weights=True, lr=lr)
        for n, p in params.items():  # a resident parameter's compute copy follows its host master
            if n in self.host_master:
                self.mirror.to_device(p.data, into=self.units[unit].params[n].data)

        def finish():
            writer.commit()
            if self._released_by_update(unit) and not (keep and self.pool.has_free(self.slab_class(unit))):
                self.release(unit)

        self.commits[unit] = self.store.committer.submit(finish)

    def _host_params(self, unit: str, params: dict) -> dict:
        """What the update steps: the parameters themselves, or with a mirror their host copies (the loaded
        unit's host views, the resident parameters' masters)."""
        if self.mirror is None:
            return params
        with self.lock:
            host = self.loaded[unit].host if unit in self.loaded else {}
        return {
            n: self.host_master[n] if n in self.host_master else nn.Parameter(host[n], requires_grad=True)
            for n in params
        }

    def _always_loaded(self) -> set[str]:
        return {u for u in self.units if not self.streamed.get(u)}

    def deferred_updates(self, coef: torch.Tensor | None, lr: float) -> None:
        """The updates the gradient store holds (clipping: each gradient times `coef` first), at `lr`. The
        units always in memory are updated now; the streamed ones are queued on the update thread in forward
        order and not waited for: the next forward waits for a unit's update only when it reaches that unit
        (ensure), so the updates run while the layers before them compute. Whatever else reads the store
        (a checkpoint, final/) drains first."""
        for unit in sorted(u for u in self._always_loaded() if u in self.with_grad_store):
            self._deferred_update(unit, coef, lr)
        for unit in [u for u in self.order if u in self.with_grad_store]:  # order: the streamed units
            self.worker.submit(unit, lambda unit=unit: self._deferred_update(unit, coef, lr), backpressure=False)
        self.norms = {}

    def _deferred_update(self, unit: str, coef: torch.Tensor | None, lr: float) -> None:
        self.worker.wait_for(unit)  # (on the training thread) its gradients' write
        params = {n: self.units[unit].params[n] for n in self.trained[unit]}
        grads = {}
        for n, p in params.items():
            g = torch.empty(p.shape, dtype=p.dtype)  # gradients have their parameter's dtype (bf16 masters)
            self.store.read(f"{unit}~grad", n, g).result()
            if coef is not None:
                g.mul_(coef)
            grads[n] = g
        self.with_grad_store.discard(unit)
        self._update(unit, params, grads, lr, keep=self.mirror is None)  # a device copy would hold the old weights
