"""The offload engine (`engine.name=offload`; engine.params / engine.optimizer, disk by default; its own options
offload.*): the Engine interface over slimtune/engines/offload.

Weights stream layer by layer from the store (engine.params=disk); in backward each decoder layer is
recomputed, or its activations were kept and its weights are read again (offload.activations), and each unit's
optimizer step runs as soon as its gradients are complete, with its state read
from and written to the store (engine.optimizer=disk). Parameters the store does not hold (LoRA factors on
a streamed base, with engine.optimizer=none) train with an ordinary in-memory optimizer beside it.

Checkpoints: the store is the checkpoint of what it holds. A snapshot (hard links + manifest, no copy) goes
to <run's store dir>/snapshots/step_N (engines/offload/rundir.py: each run owns its directory, locked while it runs)
and checkpoints/step_N names it by absolute path, with the in-memory rest as usual.
`final/` is written unit by unit: an HF directory in model.dtype, never the whole model in memory.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.registry import ENGINES
from slimtune.rules import placement
from slimtune.lm_loss import CausalLMLoss
from slimtune.engines.offload import store as store_mod
from slimtune.engines.offload.device import DeviceMirror, pin
from slimtune.engines.offload.pool import BufferPool, slab_classes
from slimtune.engines.offload.rundir import checked_snapshot, prune_snapshots
from slimtune.engines.offload.snapshot import restore, snapshot
from slimtune.engines.offload.store import UnitStore
from slimtune.engines.offload.stream import Streamer
from slimtune.engines.offload.units import resident_to, split_units, uses
from slimtune.engines.offload.settings import OffloadConfig, keep_activations, offload_active  # noqa: F401
from slimtune.engines.offload.update import OffloadOptimizer, UnitOptimizer, chunk_tensors
from slimtune.optim import build_optimizer
from slimtune.formats import checkpoint as ckpt
from slimtune.engines.offload.final import save_converted_final, save_full_final
from slimtune.engines.ddp import Engine
from slimtune.engines.setup import EngineSetup

READ_AHEAD = 4  # state chunks read ahead of the one being updated
STEP_CHUNK_RATE = 53  # bytes per value of one chunk's update at most: 8-bit moments' 41 (memory.STEP_RATE) + rounding


@ENGINES.register("offload")
class OffloadEngine(Engine):
    section = "offload"

    @classmethod
    def requires(cls, cfg) -> set[str]:
        # cpu (pinned host memory) is nothing to do on a CPU-only machine: the in-memory engine runs
        return {"streamable", "per_tensor_state"} if offload_active(cfg) else set()

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        # each layer's gradient is consumed by its update in backward; weights are in memory one layer at a time
        return {"gradients_in_memory", "trainer_step", "whole_base_weight"} if offload_active(cfg) else set()

    @classmethod
    def validate(cls, cfg) -> None:
        o, (params, optimizer) = cfg.offload, placement(cfg)
        for key in ("prefetch", "io_threads"):
            if getattr(o, key) < 1:
                raise ConfigError(f"offload.{key}={getattr(o, key)} must be >= 1")
        if params == "none" and optimizer == "none":
            raise ConfigError(
                "engine.name=offload with engine.params=none engine.optimizer=none offloads nothing: set "
                "one of them to disk (or cpu on a GPU machine), or engine.name=ddp"
            )
        for key in ("quant", "qat"):
            method = getattr(cfg, key).method
            if o.activations == "keep" and params == "disk" and method != "none":
                raise ConfigError(
                    "offload.activations=keep would keep each layer's (fake-)quantized weights for backward on a "
                    f"streamed base with {key}.method={method}; use offload.activations=recompute (or auto)"
                )
        if cfg.adapter.type == "none" and params == "disk" and optimizer != "disk":
            raise ConfigError(
                f"engine.params=disk with full fine-tuning (adapter.type=none) keeps the fp32 master "
                f"weights on disk, so their optimizer state goes there too: set engine.optimizer=disk "
                f"(not {optimizer})"
            )

    @classmethod
    def memory_terms(cls, cfg, model, s, world: int, device: str):
        """engine.params=disk: the base is streamed (only the resident unit stays: norms, rotary tables, LoRA
        factors), through (prefetch + 2) layer slabs and one embedding/head slab; engine.optimizer=disk: the
        optimizer state (and a full fine-tuning's fp32 master weights) stay in the store, updated in CHUNK
        chunks with READ_AHEAD read ahead. Nothing on disk: the in-memory engine's terms."""
        if not offload_active(cfg):
            return Engine.memory_terms(cfg, model, s, world, device)
        params, optimizer = placement(cfg)
        if params == "disk":
            s.frozen = 0 if model.full else model.root_norms + model.adapter_resident
            if model.full:  # the master weights are the store's
                s.trainable = model.root_norms
            s.offload += model.layer * (cfg.offload.prefetch + 2) + model.root_largest
        if optimizer == "disk":  # one unit's gradients at a time
            s.state = 0
            if model.full:
                s.grads = max(model.layer_trainable, model.root_largest)
            s.offload += store_mod.CHUNK * 4 * chunk_tensors(cfg.optim) * (READ_AHEAD + 2)
            s.step = min(s.step, STEP_CHUNK_RATE * store_mod.CHUNK)  # a chunk's temporaries, not a whole tensor's
        return s

    stage_on_cpu = False  # tests: run the accelerator path on CPU (compute on copies, updates on the host)
    # glibc's mmap threshold the setup stage fixes for this engine (memory.set_mmap_threshold): the churn of
    # per-layer gradients and temporaries would otherwise fragment the heap and RSS creep to ~2x the live set
    heap_mmap_threshold = 128 * 1024

    def __init__(
        self, model: nn.Module, setup: EngineSetup, device: torch.device, info, store: UnitStore, streamed_weights: bool
    ):
        if device.type not in ("cpu", "cuda"):
            raise SlimtuneError(f"offload.* runs on CPU or CUDA, not {device.type}; set train.device=cpu or cuda")
        t, o = setup.train, setup.options
        optimizer_at = setup.optimizer
        self.model, self.setup, self.options, self.device, self.info = model, setup, o, device, info
        self.store = store
        # backward recomputes each decoder layer (streamer.attach wraps their forward in checkpointing, with
        # the load inside, so the recompute loads the layer again, in reverse order)
        # no autocast cache: it would hold a bf16 copy of every streamed weight until the forward ends
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=setup.dtype == "bfloat16", cache_enabled=False
        )
        on_disk = optimizer_at == "disk"
        # names in the store (written before adapters renamed q_proj.weight to q_proj.base.weight ...)
        by_id = getattr(model, "offload_store_names", {}) if streamed_weights else {}
        by_buffer = getattr(model, "offload_store_buffers", {}) if streamed_weights else {}
        buffers = {
            f"{mn}.{attr}": by_buffer[(id(m), attr)]
            for mn, m in model.named_modules()
            for attr in m._buffers
            if (id(m), attr) in by_buffer
        }
        units = split_units(model, set(buffers))
        store_names = {n: by_id[id(p)] for u in units for n, p in u.params.items() if id(p) in by_id}
        store_names.update(buffers)
        streamed = {
            u.name: {
                n: ("train" if n in u.params and u.params[n].requires_grad else "frozen")
                for n in [*u.params, *u.buffers]
                if n in store_names and u.name != "resident"
            }
            for u in units
        }
        self.trained = {u.name: [n for n, p in u.params.items() if p.requires_grad] if on_disk else [] for u in units}
        self.in_store = {n for names in self.trained.values() for n in names}
        index = {n: i for i, (n, p) in enumerate(model.named_parameters()) if p.requires_grad}
        per_chunk = chunk_tensors(setup.optim)
        classes = slab_classes(units, streamed, o.prefetch, READ_AHEAD, store_mod.CHUNK, per_chunk)
        mirrored = {c: classes[c] for c in ("layer", "big")}
        self.mirror = DeviceMirror(device, mirrored) if device.type == "cuda" or self.stage_on_cpu else None
        self.pool = BufferPool(classes, pin=pin if device.type == "cuda" else None)
        self.unit_opt = UnitOptimizer(setup.optim, setup.optim_options, index, self.pool, READ_AHEAD)
        quantized = streamed_weights and (setup.quant_method != "none" or setup.final.qat_dtype is not None)
        self.keep_activations = keep_activations(o.activations, model, quantized, t.batch_size * t.seq_len)
        self.streamer = Streamer(
            units,
            uses(model, units, recompute=not self.keep_activations),
            store,
            self.pool,
            streamed,
            o.prefetch,
            self.unit_opt,
            self.trained,
            store_names,
            self.mirror,
        )
        self.root, self._closed = store.root.parent, False  # the run's own store directory (rundir.py)
        try:
            if device.type == "cuda":  # what stays in memory (norms, rotary tables, LoRA factors) computes there
                resident_to(model, device)
            self.streamer.attach()
        except BaseException:
            self.close()  # the update thread started with the streamer
            raise
        if info.enabled:
            self.streamer.reduce = self._all_reduce
        self.loss_model = self.train_model = CausalLMLoss(model, t.loss_chunk_tokens, self.streamer.load_for)
        self.coef = None
        self.io = {"steps": 0, "read": 0, "written": 0, "io_seconds": 0.0, "wait_seconds": 0.0, "seconds": 0.0}
        self._step_start = None

    # ------------------------------------------------------------------ the step

    def make_optimizer(self):
        resident = [(n, p) for n, p in self.trainable() if n not in self.in_store]
        self.resident_opt = (
            build_optimizer(self.setup.optim, resident, self.setup.train.lr, self.setup.optim_options)
            if resident
            else None
        )
        self.optimizer = OffloadOptimizer(self.resident_opt)
        return self.optimizer

    def forward_backward(self, x, y, n_targets, last: bool, pos=None):
        if self._step_start is None:  # the step's first micro-step: its I/O is counted from here
            s = self.store
            self._step_start = (
                time.perf_counter(),
                s.bytes_read,
                s.bytes_written,
                s.io_seconds,
                self.streamer.wait_seconds,
            )
        self.unit_opt.lr = self.optimizer.group["lr"]
        self.streamer.begin_backward(accumulate=not last, defer=self.setup.train.max_grad_norm > 0)
        saved = self.streamer.saved.hooks() if self.keep_activations else contextlib.nullcontext()
        with self.autocast, saved:
            loss = self.loss_model(*self.inputs(x, y, pos))
        (loss * self.info.world / n_targets.clamp(min=1)).backward()
        self.streamer.drain()  # the updates of this backward are on disk before anything else reads
        return loss.detach().float().cpu()

    def _all_reduce(self, grads: list[torch.Tensor]) -> None:
        """DDP's reduction, bit for bit: each gradient times 1 / world size, then summed over ranks. Host
        gradients (the CUDA path copies them out) go over NCCL through a device copy."""
        import torch.distributed as tdist

        nccl = self.device.type == "cuda" and tdist.get_backend() == "nccl"
        for g in grads:
            g.mul_(1.0 / self.info.world)
            if nccl and g.device.type == "cpu":
                d = g.to(self.device)
                tdist.all_reduce(d, op=tdist.ReduceOp.SUM)
                g.copy_(d)
            else:
                tdist.all_reduce(g, op=tdist.ReduceOp.SUM)

    def _reduce_resident(self) -> None:
        """The gradients outside the store (in-memory optimizer), reduced over ranks like the store's."""
        if self.info.enabled:
            grads = [p.grad for n, p in self.trainable() if n not in self.in_store and p.grad is not None]
            self._all_reduce(grads)

    def clip_grad_norm(self, max_norm: float):
        """torch.nn.utils.clip_grad_norm_'s arithmetic over every trainable parameter, in model order: the
        store's gradients' norms were taken when they were finished, and they are scaled at their update."""
        self._reduce_resident()  # the loop calls this once per step, after the last micro-step's backward
        if max_norm <= 0:
            return None
        norms = []
        for n, p in self.trainable():
            norm = self.streamer.norms[n] if n in self.in_store else torch.linalg.vector_norm(p.grad, 2.0)
            norms.append(norm.cpu())
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        self.coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for n, p in self.trainable():
            if n not in self.in_store:
                p.grad.mul_(self.coef)
        return total

    def step(self) -> None:
        self.streamer.release_all()
        self.streamer.deferred_updates(self.coef, self.optimizer.group["lr"])  # run ahead of the next forward
        self.coef = None
        if self.resident_opt is not None:
            self.resident_opt.step()
            self.resident_opt.zero_grad(set_to_none=True)
        t0, r0, w0, io0, wait0 = self._step_start
        s, self._step_start = self.store, None
        for key, delta in (
            ("seconds", time.perf_counter() - t0),
            ("read", s.bytes_read - r0),
            ("written", s.bytes_written - w0),
            ("io_seconds", s.io_seconds - io0),
            ("wait_seconds", self.streamer.wait_seconds - wait0),
            ("steps", 1),
        ):
            self.io[key] += delta

    def evaluate(self, fn):
        try:
            with self.autocast:
                return fn(self.loss_model)
        finally:
            self.streamer.release_all()

    # ------------------------------------------------------------------ checkpoints and the final save

    def save_checkpoint(self, root: Path, step: int, trainer_state: dict, config_yaml: str, keep: int) -> Path:
        snap = self.root / "snapshots" / f"step_{step}"
        self.streamer.drain()
        snapshot(self.store, snap, {"step": step})
        target = ckpt.save_checkpoint(
            root,
            step,
            self.model,
            self.optimizer,
            {**trainer_state, "offload": str(snap)},
            config_yaml,
            keep,
            skip=self._store_params(),
        )
        prune_snapshots(self.root, ckpt.complete_checkpoints(root))
        return target

    def load_checkpoint(self, path: Path) -> dict:
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, skip=self._store_params())
        restore(self.store, checked_snapshot(path, state.get("offload"), self.root))
        with torch.no_grad():  # weights kept in memory that the store also holds (the resident unit, ...)
            for unit, names in self.trained.items():
                for n in names:
                    p = self.streamer.units[unit].params[n]
                    if n in self.streamer.host_master:  # the accelerator path: host master, then its device copy
                        host = self.streamer.host_master[n].data
                        self.store.read(unit, n, host).result()
                        self.mirror.to_device(host, into=p.data)
                    elif n not in self.streamer.placeholder:
                        self.store.read(unit, n, p.data).result()
        return state

    def _store_params(self) -> frozenset:
        return frozenset(self.in_store) | frozenset(self.streamer.placeholder)

    def save_final(self, path: Path, base_path: str, tokenizer) -> None:
        self.streamer.drain()  # the last step's queued updates (clipping) on disk first
        if self.setup.final.qat_dtype is not None:
            save_converted_final(self, path, base_path, tokenizer)
        elif not self.setup.full:
            self.setup.final.write(self.model, path, base_path, tokenizer)  # adapters are in memory
        else:
            save_full_final(self, path, tokenizer)

    def report(self) -> dict:
        """report.json's `offload`: per training step (evals and setup excluded) the bytes read and written,
        the achieved GB/s, the I/O threads' busy time (io_seconds, summed over threads), the time the training
        thread waited for I/O or updates (wait_seconds) and computed (compute_seconds), and the share of I/O
        time hidden behind compute: 1 - wait / (io_seconds / io_threads)."""
        s, io, n = self.store, self.io, max(self.io["steps"], 1)
        io_wall = io["io_seconds"] / max(self.options.io_threads, 1)
        return {
            "offload": {
                "params": self.setup.params,
                "optimizer": self.setup.optimizer,
                "activations": "keep" if self.keep_activations else "recompute",
                "weights_reloaded_for_backward": self.streamer.saved.kept,
                "bytes_read_per_step": io["read"] / n,
                "bytes_written_per_step": io["written"] / n,
                "gb_per_second": (io["read"] + io["written"]) / 1e9 / max(io["seconds"], 1e-9),
                "io_seconds_per_step": io["io_seconds"] / n,
                "wait_seconds_per_step": io["wait_seconds"] / n,
                "compute_seconds_per_step": (io["seconds"] - io["wait_seconds"]) / n,
                "io_hidden_fraction": max(0.0, 1 - io["wait_seconds"] / io_wall) if io_wall else None,
                "bytes_read": s.bytes_read,
                "bytes_written": s.bytes_written,  # whole run, setup and evals included
                "buffer_pool_bytes": self.pool.nbytes,
                "device_buffer_bytes": self.mirror.nbytes if self.mirror else 0,
                "projection_seconds": self.unit_opt.projection_seconds,
            }
        }

    def close(self) -> None:
        """After a finished run or an error alike (raises nothing): the update and I/O threads stopped, hooks
        removed, slabs unpinned, the live store deleted (final/ holds the weights, the checkpoints their
        snapshots, which stay), then the run's lock released."""
        if self._closed:
            return
        self._closed = True
        self.streamer.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy still reads a pinned slab
        self.pool.close()
        self.store.close(delete=True)
