"""Sparse fine-tuning, SpIEL (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models").

Each wrapped matrix keeps k = round(density * out * in) active entries: `indices` (k,) int64 flat
positions r * in + c, sorted and unique, and `deltas` (k,) fp32 master values, so W' = W + scatter(deltas).
The active set starts uniformly at random (seeded per module) and is changed every few steps by
`reselect`: the entries with the smallest |delta| are dropped and as many are grown where a growth score
is largest. Two scores, both observed inside the backward of `sparse_delta_linear` from the layer's
input x (T, in) and output gradient dy (T, out), i.e. of the dense gradient g = dy^T x of W:

- "ag" (`GradAccumulator`): the dense gradient summed over the backward passes of the accumulation
  window; score |sum|. Memory: one (out, in) fp32 buffer per module, only while the window is open.
- "ma" (`SM3Stats`): row and column sums of g^2, computed exactly without the (out, in) gradient; score
  row_i * col_j (SpIEL's reference code's outer product). Memory: out + in fp32 per module, persistent.

Per step the integrator: `in_accumulation_window` -> `start()` the statistics; after the optimizer step,
`drop_fraction_at` -> `regrow` -> `remap_adam_state` on the optimizer's state of `deltas`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
import zlib

import torch
import torch.nn as nn

from slimtune.adapters.base import AdapterDefaults, AdapterTerms
from slimtune.errors import ConfigError
from slimtune.quant import is_quantized_linear
from slimtune.registry import ADAPTERS
from slimtune.schema import config_section, option

from slimtune.adapters.sparse_delta import pick_path, sparse_delta_linear  # noqa: F401  (the op, re-exported)
from slimtune.adapters.sparse_ft_regrow import (  # noqa: F401  (the regrowth half, re-exported)
    CHUNK_ELEMENTS,
    GradAccumulator,
    RegrowSchedule,
    ScoreBlocks,
    SM3Stats,
    _top_candidates,
    all_reduce_stats,
    drop_fraction_at,
    grad_square_sums,
    in_accumulation_window,
    remap_adam_state,
)


@config_section("sparse_ft", fixed=True)
@dataclass(frozen=True)
class SparseFTConfig:
    """adapter.type=sparse_ft's options (SpIEL)."""

    density: float = option("fraction of each target matrix's entries that train", 0.01)
    num_params: int = option("total trainable entries over all targets instead of density (0: use density)", 0)
    seed: int = option("seed of the initial random entries (mixed with each module's name)", 0)
    reselect_every: int = option("sparse_ft: steps between drop/regrow reselections", 20)
    drop_fraction: float = option(
        "sparse_ft: fraction of the active entries changed at the first reselection, "
        "decayed (cosine) to 0 by train.max_steps",
        0.25,
    )
    regrow: str = option(
        "sparse_ft: ma (SM3 row/column statistics, no dense gradient) | ag (dense gradient "
        "accumulated over sparse_ft.accumulate_steps)",
        "ma",
        ("ma", "ag"),
    )
    accumulate_steps: int = option("sparse_ft: steps before each reselection whose gradients feed regrowth", 5)
    grown_moments: str = option(
        "sparse_ft: Adam moments of grown entries: zero | mean (second moment seeded with "
        "the kept entries' mean, so their first steps are not amplified)",
        "zero",
        ("zero", "mean"),
    )


def module_seed(seed: int, name: str) -> int:
    """A per-module seed from the run's seed and the module's qualified name (the same on every rank)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _sample_unique(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct values of range(n), uniform without replacement, sorted (CPU int64); O(k) memory when
    k << n instead of randperm(n)'s n int64."""
    if 8 * k >= n:
        return torch.randperm(n, generator=generator)[:k].sort().values
    drawn = torch.empty(0, dtype=torch.int64)
    while drawn.numel() < k:  # the distinct values of i.i.d. draws are a uniform subset given their count
        more = torch.randint(0, n, (k - drawn.numel() + k // 8 + 16,), generator=generator)
        drawn = torch.unique(torch.cat([drawn, more]))
    return drawn[torch.randperm(drawn.numel(), generator=generator)[:k]].sort().values


def _base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


@ADAPTERS.register("sparse_ft")
class SparseFTLinear(AdapterDefaults, nn.Module):
    """y = base(x) + x S^T with S (out, in) holding `deltas` at `indices`. `base` is any linear-like module
    (nn.Linear, slimtune quantized, bitsandbytes), frozen and never copied. Give exactly one of density
    (k = max(1, round(density * out * in))) or num_params (k). seed: the initial random draw's (use
    `module_seed(run_seed, name)` so that equal-shaped modules differ). Deltas start at 0, so at init the
    output equals the base's. `grad_acc` ("ag") and `sm3` ("ma") are the regrowth statistics, off until
    start()ed; `path`: "auto" | "gather" | "dense" for `sparse_delta_linear`."""

    def __init__(self, base: nn.Module, density: float | None = None, num_params: int | None = None, seed: int = 0):
        super().__init__()
        in_f, out_f = base.in_features, base.out_features
        if (density is None) == (num_params is None):
            raise ValueError(f"give exactly one of density ({density}) and num_params ({num_params})")
        if density is not None and not 0.0 < density <= 1.0:
            raise ValueError(f"sparse_ft density must be in (0, 1], got {density}")
        k = max(1, round(density * out_f * in_f)) if num_params is None else num_params
        if not 0 < k <= out_f * in_f:
            raise ValueError(f"sparse_ft num_params={k} must be in [1, {out_f * in_f}] for a ({out_f}, {in_f}) weight")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features, self.seed = in_f, out_f, seed
        device = _base_device(base)
        generator = torch.Generator().manual_seed(seed)  # CPU draw: the same indices on every device and rank
        self.register_buffer("indices", _sample_unique(out_f * in_f, k, generator).to(device))
        self.deltas = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))  # fp32 master values
        self.grad_acc = GradAccumulator(out_f, in_f)
        self.sm3 = SM3Stats(out_f, in_f)
        self.path = "auto"
        self.merged = False
        self.register_buffer("weight_mask", None, persistent=False)  # flat bool, set_weight_mask on a pruned base

    @classmethod
    def from_config(
        cls, base: nn.Module, options: SparseFTConfig, name: str | None = None, init: str = "default"
    ) -> "SparseFTLinear":
        """options: the sparse_ft section (density, seed). name: the module's qualified name, mixed into the
        seed (`module_seed`) so that each module draws its own set."""
        seed = options.seed
        return cls(base, density=options.density, seed=seed if name is None else module_seed(seed, name))

    format = "sparse_ft"  # formats/sparse_ft.py: indices + deltas in safetensors, a JSON manifest
    section = "sparse_ft"
    plan_kind = "sparse"

    @classmethod
    def memory_terms(
        cls, options: SparseFTConfig, out_features: int, in_features: int, share: float, max_steps: int
    ) -> AdapterTerms:
        """k deltas (round(density * numel), or num_params spread by size) and their int64 indices; regrowth:
        SM3 row + column sums (ma), or a dense fp32 gradient sum during each accumulation window (ag)."""
        numel = out_features * in_features
        k = max(1, round(options.num_params * share if options.num_params else options.density * numel))
        regrow = options.regrow == "ma"
        window = max_steps > options.reselect_every - options.accumulate_steps  # a reselection is reached
        return AdapterTerms(
            [("deltas", (k,))],
            8 * k,
            4 * (in_features + out_features) if regrow else 0,
            4 * numel if not regrow and window else 0,
        )

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"whole_matrices"}  # its indices address whole matrices

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"lora_factors", "plain_lora", "streamable"}

    @classmethod
    def validate(cls, cfg) -> None:
        s = cfg.sparse_ft
        if not 0 < s.density <= 1:
            raise ConfigError(f"sparse_ft.density={s.density} must be in (0, 1]")
        if s.num_params < 0:
            raise ConfigError(f"sparse_ft.num_params={s.num_params} must be >= 0 (0: use sparse_ft.density)")
        if s.reselect_every < 1 or not 0 <= s.accumulate_steps <= s.reselect_every:
            raise ConfigError(
                f"sparse_ft.reselect_every={s.reselect_every} must be >= 1 and "
                f"sparse_ft.accumulate_steps={s.accumulate_steps} in [0, reselect_every]"
            )
        if not 0 <= s.drop_fraction <= 1:
            raise ConfigError(f"sparse_ft.drop_fraction={s.drop_fraction} must be in [0, 1]")
        if s.drop_fraction > 0 and s.accumulate_steps == 0:
            raise ConfigError(
                "sparse_ft.accumulate_steps=0 leaves regrowth without statistics; set it >= 1 (or "
                "sparse_ft.drop_fraction=0 for a fixed random set)"
            )

    @classmethod
    def configure(cls, model: nn.Module, names: list[str], options: SparseFTConfig) -> SparseFTConfig:
        """sparse_ft.num_params (a total over the targets) becomes the density every target gets."""
        if not options.num_params:
            return options
        total = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names)
        if options.num_params > total:
            raise ConfigError(
                f"sparse_ft.num_params={options.num_params} exceeds the {total} weights of the "
                "targeted matrices; lower it or target more modules"
            )
        return dataclasses.replace(options, density=options.num_params / total)

    @classmethod
    def training_hooks(cls, model: nn.Module, options: SparseFTConfig, max_steps: int) -> list:
        modules = [m for m in model.modules() if isinstance(m, cls)]
        return [RegrowSchedule(options, max_steps, modules)]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, **self.regrow_state()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if "indices" not in state or state["indices"].shape != self.indices.shape:
            raise ValueError(f"sparse_ft checkpoint state needs indices of shape {tuple(self.indices.shape)}")
        self.indices.copy_(state["indices"])
        self.grad_acc.reset()
        self.sm3.reset()
        self.load_regrow_state({k: v for k, v in state.items() if k != "indices"})

    @torch.no_grad()
    def set_weight_mask(self, mask: torch.Tensor) -> None:
        """Hold a pruned base's sparsity (mask (out, in) bool, True = kept): deltas only on kept entries, so the
        merged weights keep the base's zeros. A fresh adapter (every delta 0) draws its active set among the kept
        entries (seeded as at init; k capped at their count); a loaded one must already lie on them. Regrowth
        never grows a pruned entry."""
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight mask {tuple(mask.shape)} does not match ({self.out_features}, {self.in_features})"
            )
        dev = self.indices.device
        flat = mask.reshape(-1).to(device=dev, dtype=torch.bool)
        self.weight_mask = flat
        on_pruned = int((~flat[self.indices]).sum())
        if on_pruned == 0:
            return
        if bool(self.deltas.detach().any()):
            raise ValueError(
                f"sparse_ft: {on_pruned} trained deltas lie on pruned weights; this adapter was not "
                "trained on this pruned base"
            )
        kept = flat.nonzero().squeeze(1).cpu()
        k = min(self.num_params, kept.numel())
        pick = _sample_unique(kept.numel(), k, torch.Generator().manual_seed(self.seed))
        self.indices = kept[pick].to(dev)  # sorted: kept is ascending and pick sorted
        if k != self.deltas.numel():  # before the optimizer exists (the recovery stage of model setup)
            self.deltas = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=dev))

    def _kept_only(self, scores: torch.Tensor | ScoreBlocks) -> torch.Tensor | ScoreBlocks:
        """Growth scores with the pruned entries at -inf (ranked last: never grown while kept ones remain)."""
        if self.weight_mask is None:
            return scores
        mask = self.weight_mask.view(self.out_features, self.in_features)
        if torch.is_tensor(scores):
            return scores.masked_fill(~mask.to(scores.device), -math.inf)

        def kept_rows(r0: int, r1: int) -> torch.Tensor:
            s = scores(r0, r1)
            return s.masked_fill(~mask[r0:r1].to(s.device), -math.inf)

        return kept_rows

    @property
    def num_params(self) -> int:
        return self.deltas.numel()

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices // self.in_features, self.indices % self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in the base output's dtype."""
        y = self.base(x)
        if self.merged:
            return y
        observers = tuple(s for s in (self.grad_acc, self.sm3) if s.active) if torch.is_grad_enabled() else ()
        rows, cols = self.rows_cols()
        delta = sparse_delta_linear(x, rows, cols, self.deltas, self.out_features, self.path, observers)
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: the deltas scattered at their indices, zero elsewhere."""
        dense = torch.zeros(self.out_features * self.in_features, dtype=torch.float32, device=self.deltas.device)
        dense[self.indices] = self.deltas.detach().float()
        return dense.view(self.out_features, self.in_features)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.deltas]

    def regrow_state(self) -> dict[str, torch.Tensor]:
        """The allocated statistics by name ("ag_grad", "sm3_row", "sm3_col"), for checkpoints: the module's
        state_dict holds `indices` and `deltas` only."""
        named = {"ag_grad": self.grad_acc.grad, "sm3_row": self.sm3.row, "sm3_col": self.sm3.col}
        return {key: t for key, t in named.items() if t is not None}

    def load_regrow_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of regrow_state(); a statistic present is restored onto the deltas' device and switched on."""
        dev = self.deltas.device
        if "ag_grad" in state:
            self.grad_acc.grad, self.grad_acc.active = state["ag_grad"].to(dev, torch.float32, copy=True), True
        if "sm3_row" in state:
            self.sm3.row = state["sm3_row"].to(dev, torch.float32, copy=True)
            self.sm3.col, self.sm3.active = state["sm3_col"].to(dev, torch.float32, copy=True), True

    def regrow_stats(self) -> list[torch.Tensor]:
        """The live regrowth statistics (for `all_reduce_stats` before reselection): ag's buffer, SM3's row/col."""
        return [t for t in (self.grad_acc.grad, self.sm3.row, self.sm3.col) if t is not None]

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Add the deltas into a plain nn.Linear's weight, touching only the k active entries (their previous
        values are kept, k values, so unmerge() restores the weight bit for bit). A quantized base is refused:
        its quantization step is far coarser than the sparse deltas. safe: raise, unmerged, if non-finite."""
        if self.merged:
            raise RuntimeError("sparse_ft adapter is already merged; unmerge() first")
        base = self.base
        if not isinstance(base, nn.Linear) or is_quantized_linear(base):
            raise NotImplementedError(
                f"cannot merge sparse_ft into {type(base).__name__} in place; export with "
                "`slimtune export RUN_DIR --merge`, which merges into the full-precision base"
            )
        flat = base.weight.view(-1)
        before = flat[self.indices].clone()
        new = before.float() + self.deltas.float()
        if safe and not torch.isfinite(new).all():
            raise ValueError("merging this sparse_ft adapter gives non-finite weights; not merged")
        flat[self.indices] = new.to(flat.dtype)
        self._weights_before_merge = before
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("sparse_ft adapter is not merged")
        self.base.weight.view(-1)[self.indices] = self._weights_before_merge
        del self._weights_before_merge
        self.merged = False

    @torch.no_grad()
    def reselect(self, n_change: int, scores: torch.Tensor | ScoreBlocks) -> tuple[torch.Tensor, torch.Tensor]:
        """SpIEL's drop and grow. Drop the n_change active entries of smallest |delta| (ties: the lower flat
        index first); grow the n_change highest `scores` among entries neither active nor just dropped, with
        delta 0. scores: a dense (out, in) tensor, or f(row_start, row_end) -> (row_end - row_start, in)
        scores of those rows (evaluated a block at a time). n_change is clipped to [0, min(k, kept - k)] (kept:
        out*in, or the kept entries of a pruned base).
        `indices` stays sorted, k is unchanged, and `deltas` (same Parameter, rewritten in place; its .grad
        too) keeps the kept entries' values. Returns (old_to_new (k,): each old entry's new position or -1
        if dropped, new_to_old (k,): each new entry's old position or -1 if grown), for `remap_adam_state`."""
        if self.merged:
            raise RuntimeError("unmerge() before reselecting")
        k, dev = self.num_params, self.indices.device
        available = self.out_features * self.in_features if self.weight_mask is None else int(self.weight_mask.sum())
        n = max(0, min(int(n_change), k, available - k))
        if n == 0:
            same = torch.arange(k, device=dev)
            return same, same.clone()
        drop = torch.sort(self.deltas.detach().abs(), stable=True).indices[:n]  # stable: ties by position = index
        kept = torch.ones(k, dtype=torch.bool, device=dev)
        kept[drop] = False
        grown = _top_candidates(self._kept_only(scores), n, self.indices, self.out_features, self.in_features)
        kept_pos = kept.nonzero().squeeze(1)
        new_indices, order = torch.sort(torch.cat([self.indices[kept_pos], grown.to(dev)]))
        new_to_old = torch.cat([kept_pos, torch.full((n,), -1, dtype=torch.int64, device=dev)])[order]
        old_to_new = torch.full((k,), -1, dtype=torch.int64, device=dev)
        old_to_new[new_to_old[new_to_old >= 0]] = (new_to_old >= 0).nonzero().squeeze(1)
        self.indices.copy_(new_indices)
        for t in (self.deltas.data, self.deltas.grad):
            if t is not None:
                moved = torch.where(
                    new_to_old >= 0, t[new_to_old.clamp_min(0)], torch.zeros((), dtype=t.dtype, device=t.device)
                )
                t.copy_(moved)
        return old_to_new, new_to_old

    def growth_scores(self, criterion: str) -> ScoreBlocks:
        """The score blocks of criterion "ag" (|accumulated gradient|) or "ma" (SM3 estimate)."""
        if criterion == "ag":
            return self.grad_acc.score_blocks()
        if criterion == "ma":
            return self.sm3.score_blocks()
        raise ValueError(f"sparse_ft regrowth criterion must be ag or ma, got {criterion!r}")

    def regrow(self, fraction: float, criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
        """reselect(int(fraction * k), growth_scores(criterion)); then frees ag's buffer (its window is over).
        SM3's accumulators are kept (reset them with `sm3.reset()` for windowed statistics)."""
        mapping = self.reselect(int(fraction * self.num_params), self.growth_scores(criterion))
        if criterion == "ag":
            self.grad_acc.reset()
        return mapping

    def extra_repr(self) -> str:
        total = self.out_features * self.in_features
        return f"num_params={self.num_params}, density={self.num_params / total:.4g}, merged={self.merged}"
