"""The optimizer step of one unit, with its state streamed from and to the store.

Elementwise AdamW (optim.name=adamw, fp32 or 8-bit moments, and the full-rank group of galore / dct /
frugal) goes CHUNK elements at a time: read the chunk's moments (a few chunks ahead), `adamw_update` on the
slices of weight, gradient and moments, write weight and moments back. Every operation is elementwise (8-bit
blocks of 256 never straddle a chunk), so the result is bit for bit the in-memory optimizer's, and only a few
chunks of state are in memory at once, whatever the size of the parameter (a 100M-row embedding too).

Everything else (galore / dct / frugal's projected matrices, sgd) is stepped by the real optimizer class,
built for that one parameter, with its state loaded whole: those states are small by design.

In the store, unit `u` holds each parameter `p`'s weight under `p` (when the weights live on disk) and its
state tensors under `p:key`; scalars (FRUGAL's step counters, ...) go in the unit's JSON metadata.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import torch
import torch.nn as nn

from slimtune.engines.offload import store as store_mod
from slimtune.engines.offload.store import UnitStore
from slimtune.optim import build_optimizer, lowrank_groups
from slimtune.optim.adam_core import adamw_update, moment_bits
from slimtune.optim.master import KAHAN_KEY, compensation_of, param_key
from slimtune.optim.states8bit import BLOCK, num_blocks


def state_key(param: str, key: str) -> str:
    return f"{param}:{key}"


def chunk_tensors(optim) -> int:
    """State tensors streamed per chunk by `_adamw_chunks`: Adam's two moments, plus Kahan's buffer (bf16 masters)."""
    return 3 if compensation_of(optim) == "kahan" else 2


class UnitOptimizer:
    """optim: the optim section; options: the optimizer's own section (galore.*, frugal.*, ...; None for adamw). `index`
    numbers every trainable parameter of the model (the per-parameter seeds of random subspaces, as
    optimizer-in-backward does). `lr` is set by the loop every step."""

    def __init__(self, optim, options, index: dict[str, int], pool=None, read_ahead: int = 4):
        """pool: a BufferPool with a "chunk" class (CHUNK fp32 values per slab, 2 x (read_ahead + 2) of them)."""
        self.optim, self.options, self.index, self.read_ahead = optim, options, index, read_ahead
        self.pool = pool
        self.lr = 0.0
        self.projection_seconds = 0.0
        self.compensation = compensation_of(optim)

    def elementwise(self, name: str, p: nn.Parameter) -> bool:
        """Chunked AdamW for this parameter (the optimizer's own arithmetic for it is adamw_update)?"""
        if self.optim.name == "adamw":
            return True
        if self.optim.name == "sgd":
            return False
        return not any(g["lowrank"] for g in lowrank_groups(self.optim, [(name, p)]))

    def _adam_specs(self, name: str, p: torch.Tensor) -> dict[str, tuple[torch.dtype, tuple]]:
        n = p.numel()
        if moment_bits(p.shape, self.optim.state_bits, p.dim()) == 32:
            moments = {"exp_avg": (torch.float32, (n,)), "exp_avg_sq": (torch.float32, (n,))}
        else:
            moments = {
                "exp_avg_q_int8": (torch.int8, (n,)),
                "exp_avg_absmax": (torch.float32, (num_blocks(n),)),
                "exp_avg_sq_q_uint8": (torch.uint8, (n,)),
                "exp_avg_sq_absmax": (torch.float32, (num_blocks(n),)),
            }
        if self.compensation == "kahan" and p.dtype != torch.float32:
            moments[KAHAN_KEY] = (p.dtype, (n,))
        return {state_key(name, k): v for k, v in {"step": (torch.float32, ()), **moments}.items()}

    @torch.no_grad()
    def step(
        self,
        store: UnitStore,
        unit: str,
        params: dict[str, nn.Parameter],
        grads: dict[str, torch.Tensor],
        write_weights: bool,
        lr: float | None = None,
    ):
        """Update `params` in place (their .data: the fp32 master weights) from `grads`, and queue the unit's
        new version: the weights (if write_weights) and every state tensor. Returns the writer, whose commit()
        (waiting for the writes) makes it the current version. lr: the step's (default: self.lr)."""
        lr = self.lr if lr is None else lr
        old = StateSource(store, unit)
        meta, small, specs, chunked = {}, {}, [], []
        for name, p in params.items():
            if write_weights:
                specs.append((name, p.dtype, tuple(p.shape)))
            if self.elementwise(name, p):
                adam = self._adam_specs(name, p)
                chunked.append((name, p, grads[name], adam))
                specs += [(k, dt, shape) for k, (dt, shape) in adam.items()]
                continue
            state, meta[name] = self._generic(name, p, grads[name], old, lr)
            for k, t in state.items():
                small[state_key(name, k)] = t
                specs.append((state_key(name, k), t.dtype, tuple(t.shape)))
        writer = store.writer(unit, specs, meta)
        try:
            for k, t in small.items():
                writer.write(k, t)
            self._adamw_chunks(chunked, old, writer, lr)
            if write_weights:
                for name, p in params.items():
                    writer.write(name, p.data)
        except BaseException:
            writer.abort()
            raise
        return writer

    def _generic(self, name: str, p: nn.Parameter, g: torch.Tensor, old: "StateSource", lr: float) -> tuple[dict, dict]:
        options = self.options
        if options is not None and hasattr(options, "seed"):
            options = dataclasses.replace(options, seed=options.seed * 1_000_003 + self.index[name])
        opt = build_optimizer(self.optim, [(name, p)], lr, options)
        state = old.tensors_of(name)
        if state:
            opt.state[p] = {**state, **old.scalars_of(name)}
        p.grad = g
        try:
            opt.step()
        finally:
            p.grad = None
        self.projection_seconds += getattr(opt, "projection_seconds", 0.0)
        out = opt.state[p]
        return (
            {k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)},
            {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)},
        )

    def _adamw_chunks(self, jobs: list, old: "StateSource", writer, lr: float) -> None:
        """Chunked AdamW over every (parameter, chunk) of the unit in one pipeline: the moments of the next
        `read_ahead` chunks are being read into pooled slabs while one chunk is updated, and a slab goes
        back to the pool when its write is done."""
        group = {
            "lr": lr,
            "betas": tuple(self.optim.betas),
            "eps": self.optim.eps,
            "weight_decay": self.optim.weight_decay,
            "state_bits": self.optim.state_bits,
            "compensation": self.compensation,
        }
        chunk = store_mod.CHUNK
        plan, params = [], []
        for name, p, g, specs in jobs:
            step_key = state_key(name, "step")
            whole = [k for k in specs if k.endswith("_absmax")]  # one value per 256 elements: read whole
            fresh = not old.has(step_key)
            params.append(
                {
                    "name": name,
                    "key": param_key(name),
                    "w": p.data.reshape(-1),
                    "g": g.reshape(-1),
                    "specs": specs,
                    "fresh": fresh,
                    "chunked": [k for k in specs if k != step_key and k not in whole],
                    "step": torch.zeros((), dtype=torch.float32) if fresh else old.read(step_key).result(),
                    "absmax": {
                        k: torch.zeros(specs[k][1], dtype=specs[k][0]) if fresh else old.read(k).result() for k in whole
                    },
                }
            )
            plan += [(len(params) - 1, s, min(p.numel(), s + chunk)) for s in range(0, p.numel(), chunk)]

        def fetch(j: int, start: int, stop: int) -> dict:
            job, out = params[j], {}
            for k in job["chunked"]:
                slab = self.pool.acquire("chunk")
                view = slab.view(0, job["specs"][k][0], (stop - start,))
                out[k] = (slab, view, _done(view.zero_()) if job["fresh"] else old.store.read(old.unit, k, view, start))
            return out

        ahead = deque(fetch(*plan[i]) for i in range(min(self.read_ahead, len(plan))))
        for i, (j, start, stop) in enumerate(plan):
            if i + self.read_ahead < len(plan):
                ahead.append(fetch(*plan[i + self.read_ahead]))
            job, bufs = params[j], ahead.popleft()
            st = {"step": job["step"].clone()}
            for k, (slab, view, f) in bufs.items():
                f.result()
                st[k.split(":", 1)[1]] = view
            for k, t in job["absmax"].items():
                st[k.split(":", 1)[1]] = t[start // BLOCK : -(-stop // BLOCK)]
            adamw_update(st, job["w"][start:stop], job["g"][start:stop].float(), group, job["key"], start)
            for k, (slab, view, f) in bufs.items():
                writer.write(k, view, start).add_done_callback(lambda _, s=slab: self.pool.release(s))
            if stop == job["w"].numel():  # the parameter's last chunk: its step and scales
                for k, t in job["absmax"].items():
                    writer.write(k, t)
                writer.write(state_key(job["name"], "step"), st["step"])


def _done(value):
    from concurrent.futures import Future

    f = Future()
    f.set_result(value)
    return f


class StateSource:
    """A unit's previous version in the store (absent before its first step)."""

    def __init__(self, store: UnitStore, unit: str):
        self.store, self.unit = store, unit
        present = store.has(unit)
        self.names = set(store.specs(unit)) if present else set()
        self.meta = store.meta(unit) if present else {}

    def has(self, key: str) -> bool:
        return key in self.names

    def read(self, key: str, start: int = 0, count: int | None = None):
        """A future of the tensor (flattened elements [start, start + count) when count is given)."""
        e = self.store.specs(self.unit)[key]
        out = torch.empty(count if count is not None else e.shape, dtype=e.torch_dtype)
        return self.store.read(self.unit, key, out, start)

    def tensors_of(self, param: str) -> dict[str, torch.Tensor]:
        prefix = param + ":"
        return {k[len(prefix) :]: self.read(k).result() for k in sorted(self.names) if k.startswith(prefix)}

    def scalars_of(self, param: str) -> dict:
        return dict(self.meta.get(param, {}))


class OffloadOptimizer:
    """What the loop holds as its optimizer: the lr group the unit updates read, plus the in-memory
    optimizer of the parameters outside the store (if any)."""

    def __init__(self, resident: torch.optim.Optimizer | None):
        self.resident = resident
        self.group = {"lr": 0.0}

    @property
    def param_groups(self) -> list[dict]:
        return [self.group] + (self.resident.param_groups if self.resident else [])

    def state_dict(self) -> dict:
        return self.resident.state_dict() if self.resident else {}

    def load_state_dict(self, state: dict) -> None:
        if self.resident:
            self.resident.load_state_dict(state)
