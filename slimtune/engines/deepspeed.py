"""`engine.name=deepspeed`: DeepSpeed ZeRO (stage 0-3, its own CPU / NVMe offload) under slimtune's loop.

The loss module is what DeepSpeed wraps, so under ZeRO-3 the head's weight is gathered when the chunked loss
reads it (the loss module's forward is DeepSpeed's forward). slimtune's optimizer (AdamW / SGD) is the client
optimizer; ZeRO partitions its state. The recipe sets the batch sizes, clipping and precision; a JSON of one's
own (`deepspeed.config`) adds or overrides the rest; the config used is written to output_dir/deepspeed.json.
Where state lives is engine.optimizer / engine.params (cpu, or disk = NVMe under deepspeed.nvme_dir; params
from ZeRO-3 on), with `max_in_cpu: 0` and `stage3_max_reuse_distance: 0` so they really stay on NVMe rather
than in a CPU cache.

The loop's micro-steps map onto DeepSpeed's: each backward runs through `engine.backward` (not divided by
grad_accum: the loop already divides by the global batch's target count) and each micro-step but the last
calls `engine.step()`, which only counts; the loop's `step()` is DeepSpeed's boundary step (clip + update).

Checkpoints keep slimtune's layout: the full fp32 weights and optimizer moments gathered per parameter by name
(`deepspeed.utils.safe_get_full_*`: ZeRO-3 parameters, and the fragments of ZeRO-1/2's flat partitions), written
by rank 0, restored with `safe_set_full_*` (and, under ZeRO 0-2, into the whole weights every rank computes
with), so a run saved on N processes resumes on any other number, at any stage, and never through DeepSpeed's
pickled checkpoint files. The gathers are collectives: every rank saves (Engine.gathers_state), rank 0 writes.
ZeRO-0 keeps no fragments: a bf16 model's fp32 masters are DeepSpeed's master copies (flat groups or one per
parameter), an fp32 model's weights and the client optimizer's state are read as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from dataclasses import dataclass

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.io import write_json
from slimtune.registry import ENGINES
from slimtune.rules import placement
from slimtune.schema import config_section, option
from slimtune.optim import build_optimizer
from slimtune.formats import checkpoint as ckpt
from slimtune.engines.ddp import Engine
from slimtune.engines.fsdp2 import one_rank_group
from slimtune.engines.setup import EngineSetup

MOMENTS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce / allgather bucket size
DEVICE = {"cpu": "cpu", "disk": "nvme"}  # engine.params / engine.optimizer -> DeepSpeed's offload device


@config_section("deepspeed")
@dataclass(frozen=True)
class DeepSpeedConfig:
    """engine.name=deepspeed's options (where state lives: engine.params / engine.optimizer)."""

    zero_stage: int = option("ZeRO stage 0..3", 2, (0, 1, 2, 3))
    nvme_dir: str = option("engine.*=disk: DeepSpeed's swap directory (default: nvme/ inside output_dir)", "")
    config: str = option(
        "a DeepSpeed JSON of one's own (batch sizes, lr and clipping still come from the recipe); "
        "the config used is written to output_dir either way",
        "",
    )


def deepspeed_config(setup: EngineSetup, world: int) -> dict:
    """The DeepSpeed JSON of an engine setup (engines/setup.py): the user's deepspeed.config with the
    recipe's settings."""
    e, t = setup.options, setup.train
    own = {}
    if e.config:
        try:
            own = json.loads(Path(e.config).expanduser().read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SlimtuneError(f"deepspeed.config={e.config}: cannot read it as JSON ({err}); fix the file") from None
    zero = {"stage": e.zero_stage, **own.get("zero_optimization", {})}
    zero["stage"] = (
        e.zero_stage
        if "zero_optimization" not in own or "stage" not in own["zero_optimization"]
        else own["zero_optimization"]["stage"]
    )
    nvme = e.nvme_dir or str(Path(setup.output_dir) / "nvme")
    params, optimizer = setup.params, setup.optimizer
    for key, where in (("offload_optimizer", optimizer), ("offload_param", params)):
        if where == "none" or (key == "offload_param" and zero["stage"] != 3):
            continue
        target = {"device": DEVICE[where], **({"nvme_path": nvme} if where == "disk" else {})}
        zero.setdefault(key, {**target, **({"max_in_cpu": 0} if key == "offload_param" and where == "disk" else {})})
        if key == "offload_param" and where == "disk":
            zero.setdefault("stage3_max_reuse_distance", 0)
            zero.setdefault("stage3_prefetch_bucket_size", 0)
    out = {k: v for k, v in own.items() if k != "zero_optimization"}
    out.update(
        {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * world,
            "gradient_clipping": t.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": setup.dtype == "bfloat16" and setup.full},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
    )
    out.setdefault(
        "aio",
        {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True, "thread_count": 1},
    )
    return out


@ENGINES.register("deepspeed")
class DeepSpeedEngine(Engine):
    section = "deepspeed"

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        # ZeRO partitions optimizer state (1-2) and parameters (3) over the ranks
        return {"whole_matrices"} | ({"whole_base_weight"} if cfg.deepspeed.zero_stage == 3 else set())

    @classmethod
    def validate(cls, cfg) -> None:
        e = cfg.deepspeed
        params, optimizer = placement(cfg)
        if optimizer != "none" and e.zero_stage < 2:
            raise ConfigError(f"engine.optimizer={optimizer} needs deepspeed.zero_stage>=2 (got {e.zero_stage})")
        if params != "none" and e.zero_stage != 3:
            raise ConfigError(f"engine.params={params} needs deepspeed.zero_stage=3 (got {e.zero_stage})")
        if e.config and not Path(e.config).expanduser().is_file():
            raise ConfigError(f"deepspeed.config={e.config}: no such file; give the path of a DeepSpeed JSON")

    @classmethod
    def memory_terms(cls, cfg, model, s, world: int, device: str):
        """Stage 0: as DDP plus its gradient bucket; >= 1: optimizer state / W and ZeRO's fp32 copy of its
        parameter partition; stage 1 keeps full gradients, >= 2 a partition / W plus the reduce bucket; stage 3
        parameters / W plus the gathered layer. engine.optimizer / engine.params = cpu move them to host memory
        (on a CPU-only machine the same RAM), disk to NVMe."""
        stage, host = cfg.deepspeed.zero_stage, device == "cpu"
        params, optimizer = placement(cfg)
        full_grads = s.grads
        bucket = min(BUCKET_ELEMENTS * 4, full_grads)
        if stage == 0:
            s.engine = bucket
            return s
        master = -(-s.trainable // world)  # ZeRO's fp32 copy of this rank's partition
        s.state = -(-s.state // world)
        if stage == 1:
            s.grads = full_grads + -(-full_grads // world)
        else:
            s.grads = -(-full_grads // world)
            s.engine = bucket
        if stage == 3:
            s.frozen, s.trainable = -(-s.frozen // world), -(-s.trainable // world)
            s.engine += 2 * model.layer + model.root
            if params == "disk" or (params == "cpu" and not host):
                s.frozen, s.trainable = 0, 0
        if optimizer == "disk" or (optimizer == "cpu" and not host):
            s.state, master = 0, 0
        s.trainable += master
        return s

    def __init__(self, model: nn.Module, setup: EngineSetup, device: torch.device, info, recovery=None):
        if recovery is not None and recovery.held is not None:
            raise SlimtuneError(
                "engine.name=deepspeed: full fine-tuning of a pruned base holds masks on whole "
                "weights, which ZeRO partitions; recover with adapter.type=lora, or engine.name=ddp"
            )
        if not info.enabled:  # kept for the process: DeepSpeed's communicator caches this group
            one_rank_group()
            # deepspeed.initialize reads them even with a group in place; close() takes them back, or a
            # later transformers.Trainer in this process would take itself for a torchrun rank
            self.env_added = [k for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE") if k not in os.environ]
            os.environ.update({k: "1" if k == "WORLD_SIZE" else "0" for k in self.env_added})
        self.linear = torch.nn.functional.linear  # ZeRO-3 replaces it process-wide ("persists unless reset")
        super().__init__(model, setup, device, info, recovery, wrap=False)
        self.sharded = setup.options.zero_stage == 3  # ZeRO-3's forward gathers parameters: collective
        self.gathers_state = True  # ZeRO 1-3 and the bf16 optimizer hold fragments: gathered on every rank
        self.ds_config = deepspeed_config(setup, info.world)
        if info.is_main:
            Path(setup.output_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(setup.output_dir) / "deepspeed.json", self.ds_config)

    def make_optimizer(self) -> torch.optim.Optimizer:
        import deepspeed

        named = self.trainable()
        self.names = {id(p): n for n, p in named}
        s = self.setup
        client = build_optimizer(s.optim, named, s.train.lr, s.optim_options)
        self.ds, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=self.train_model,
            optimizer=client,
            config=self.ds_config,
            model_parameters=[p for _, p in named],
            dist_init_required=False,
        )
        self.optimizer = client  # the loop sets the lr on its param groups, which ZeRO's optimizer shares
        return client

    def close(self) -> None:
        """Undo what ZeRO-3 changes process-wide (F.linear "persists unless manually reset"), so a later run
        in the same process (a notebook, a test session) computes as it would alone."""
        if getattr(self, "ds", None) is not None:
            self.ds.destroy()
        torch.nn.functional.linear = self.linear
        for k in getattr(self, "env_added", ()):
            os.environ.pop(k, None)

    def forward_backward(self, x, y, n_targets, last: bool, pos=None) -> torch.Tensor:
        with self.autocast:
            loss = self.ds(*self.inputs(x, y, pos))
        self.ds.backward(loss * self.info.world / n_targets.clamp(min=1), scale_wrt_gas=False)
        if not last:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step
        return loss.detach().float().cpu()

    def clip_grad_norm(self, max_norm: float):
        return None  # DeepSpeed clips at the boundary step (gradient_clipping)

    def step(self) -> None:
        self.ds.step()

    def evaluate(self, fn):
        with self.autocast:
            return fn(self.ds)

    # ---------------------------------------------------------------- checkpoints: full fp32 state by name

    def _full(self, p, key: str | None = None):
        """The full fp32 weight (key None) or optimizer moment `key` of parameter p. ZeRO 1-3 and the bf16
        optimizer hold fragments of flat partitions: gathered (a collective: every rank calls this, for every
        parameter, in the same order). ZeRO-0 in fp32: the parameter and the client optimizer's own state."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            return safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        master = self._master_view(p, key)
        if master is not None:
            return master
        return p.data if key is None else self.optimizer.state.get(p, {}).get(key)

    def _master_view(self, p, key: str | None = None):
        """ZeRO-0 with a low-precision model (DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer, bf16 too):
        p's fp32 master weight (or the inner optimizer's state `key` of it): a part of its group's flat master
        tensor (the group's parameters concatenated in order) or its own fp32 copy. None for other optimizers."""
        opt = self.ds_optimizer
        groups = getattr(opt, "fp16_groups", None)
        flats, copies = getattr(opt, "fp32_groups_flat", None), getattr(opt, "fp32_groups", None)
        if groups is None or (flats is None and copies is None):
            return None
        state = opt.optimizer.state
        for i, group in enumerate(groups):
            offset = 0
            for j, q in enumerate(group):
                if q is p:
                    master = flats[i] if flats is not None else copies[i][j]
                    t = master if key is None else state.get(master, {}).get(key)
                    if t is None or flats is None:
                        return t
                    return t.narrow(0, offset, p.numel()).view_as(p)
                offset += q.numel()
        return None

    def _set_full(self, p, value: torch.Tensor, key: str | None = None) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            if key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
        elif (master := self._master_view(p, key)) is not None:
            with torch.no_grad():
                master.copy_(value)
        elif key is not None:
            self.optimizer.state[p][key] = value.clone()
        if key is None and not hasattr(p, "ds_id"):  # ZeRO 0-2: every rank computes with whole weights
            with torch.no_grad():
                p.data.copy_(value.to(p.dtype))

    def _full_state(self) -> tuple[dict, dict]:
        weights, state = {}, {}
        for n, p in self.trainable():
            weights[n] = self._full(p).detach().cpu().clone()
            moments = {k: self._full(p, k) for k in self._moment_keys()}
            if moments and all(v is not None for v in moments.values()):
                state[n] = {k: v.detach().cpu().clone() for k, v in moments.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return weights, {"state": state, "param_groups": groups}

    def save_checkpoint(self, root: Path, step: int, trainer_state: dict, config_yaml: str, keep: int) -> Path:
        weights, optim = self._full_state()  # gathers: every rank
        if self.info.is_main:
            ckpt.save_state(
                root,
                step,
                weights,
                optim,
                {**trainer_state, "optimizer_steps": _optimizer_steps(self.ds_optimizer, step)},
                config_yaml,
                keep,
            )
        return Path(root) / f"step_{step}"

    def load_checkpoint(self, path: Path) -> dict:
        weights, optim, state = ckpt.read_state(path)
        named = dict(self.trainable())
        if set(weights) != set(named) or not set(optim.get("state", {})) <= set(named):
            diff = sorted(set(weights) ^ set(named))
            raise SlimtuneError(
                f"checkpoint {path} does not match the model (e.g. '{diff[0] if diff else '?'}'); "
                "resume with the config it was written with"
            )
        if optim["state"]:
            _init_state(self.ds_optimizer, self._moment_keys())
            link = getattr(self.ds_optimizer, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:  # ZeRO 1-2 / bf16: point each parameter's fragments at the states just made
                link()
        for n, p in named.items():
            self._set_full(p, weights[n].to(self.device))
            for k, v in optim["state"].get(n, {}).items():
                self._set_full(p, v.to(self.device), k)
        # ZeRO-3: the model's partitions are copied from the fp32 master partitions after each step; do it now,
        # as DeepSpeed's own checkpoint loader does (load_hp_checkpoint_state_from_checkpoint_dir_stage3)
        for i in range(len(getattr(self.ds_optimizer, "fp32_partitioned_groups_flat", []))):
            self.ds_optimizer._reassign_or_swap_out_partitioned_parameters(i)
        _set_optimizer_steps(self.ds_optimizer, int(state.get("optimizer_steps", state["step"])))
        return state

    def _moment_keys(self) -> tuple[str, ...]:
        o = self.setup.optim
        return () if o.name == "sgd" and not self.setup.optim_options.momentum else MOMENTS[o.name]

    def save_final(self, path: Path, base_path: str, tokenizer) -> None:
        """Full fp32 weights gathered (every rank), put into the plain model on rank 0, saved as usual."""
        full = {n: self._full(p).detach().cpu().clone() for n, p in self.trainable()}  # gathers: every rank
        if not self.info.is_main:
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(
            [p for _, p in self.model.named_parameters() if not p.requires_grad]
            if self.options.zero_stage == 3
            else [],
            modifier_rank=None,
        ):
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in full:
                        p.data = full[n].to(p.device, p.dtype) if p.numel() == full[n].numel() else full[n]
            self.setup.final.write(self.model, path, base_path, tokenizer)
        self.save_final_extras(path)


def _init_state(ds_optimizer, keys) -> None:
    """The inner optimizer creates its state at its first step; a resume writes into it before that, so the
    state of each flat fp32 partition is created here (zeros, step 0) as AdamW / SGD would create it."""
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    flats = getattr(ds_optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 empties param_groups between steps
    for flat in flats if flats is not None else [p for g in inner.param_groups for p in g["params"]]:
        st = inner.state[flat]
        for k in keys:
            st.setdefault(k, torch.zeros_like(flat, memory_format=torch.preserve_format))
        if "exp_avg" in keys:
            st.setdefault("step", torch.tensor(0.0))


def _optimizer_steps(ds_optimizer, default: int) -> int:
    """The updates the inner optimizer made (its states' "step"): fewer than the loop's steps where DeepSpeed
    skipped one (a loss-scale overflow of its fp16/bf16 optimizer)."""
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    steps = [float(st["step"]) for st in inner.state.values() if "step" in st]
    return int(max(steps)) if steps else default


def _set_optimizer_steps(ds_optimizer, steps: int) -> None:
    """Adam's bias correction reads the inner optimizer's per-state "step": restored from the loop's step."""
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    for st in inner.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], float(steps)) if torch.is_tensor(st["step"]) else steps
