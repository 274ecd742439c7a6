"""CrAM+ (Peste et al. 2023, "CrAM: A Compression-Aware Minimizer"): train a dense model whose loss stays low
after one-shot pruning. Each step takes two gradients on the same batch:

    g      = grad L(w)                                   (the clean gradient)
    w~     = C(w + rho * g)                              C: top-k magnitude (or N:M) per tensor of dim >= 2
    g~     = mask(w~) * grad L(w~)                       the paper's masked ("sparse") gradient
    w     <- base_step(w, g~ + g)                        CrAM+; plain CrAM (plus=False) uses g~ alone

The sparsity s is drawn each step, uniformly from `sparsities` (or an (n, m) pattern from `nm`), with the
optimizer's own seeded generator (the same seed on every rank gives every rank the same draw). C keeps the
round((1 - s) * numel) largest |values| of each tensor; 1-D parameters (norms, biases) are perturbed but not
compressed, and N:M leaves a tensor whose last dim is not a multiple of m uncompressed.

Deviations from the reference code (IST-DASLab/CrAM, TopkCrAM): C is per tensor (its `unif_prune` option) rather
than one global magnitude threshold over all tensors (which would need every |w| at once), an exact top-k instead
of a `> percentile` threshold (same up to ties), N:M groups run along the last dim and patterns are drawn from
`nm` instead of a fixed 2:4 / 4:8 coin flip. As there (grad_norm=False), rho * g is not normalized (SAM would).

Memory: between perturb() and step() a copy of every perturbed weight and (CrAM+) of its clean gradient is kept,
plus a bool mask per compressed tensor. Not usable with optimizer-in-backward (it needs two full gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dataclasses import dataclass

import torch

from slimtune.errors import ConfigError
from slimtune.registry import OPTIONS
from slimtune.schema import PATTERNS, config_section, option
from slimtune.technique import Technique


@config_section("cram")
@dataclass(frozen=True)
class CramConfig:
    """optim.cram=true's options."""

    rho: float = option("optim.cram: step size of the perturbation w + rho g", 0.05)
    sparsities: tuple[float, ...] = option("optim.cram: top-k sparsity, one drawn per step", (0.5, 0.6, 0.7))
    pattern: str = option(
        "optim.cram: unstructured (cram.sparsities) | 2:4 | 4:8", "unstructured", PATTERNS, ratio=True
    )
    plus: bool = option("CrAM+: add the clean gradient to the compressed one", True)
    seed: int = option("optim.cram: seed of the sparsity draws", 0)


class CrAM(torch.optim.Optimizer):
    """CrAM(base, rho, sparsities, nm, plus, seed, masked_grad) wrapping a built base optimizer.

    Closure API (self-contained):
        loss = cram.step(closure)     # closure(): zero grads, forward, backward, return the loss at w
    Closure-free API (a trainer that runs forward/backward itself, e.g. with gradient accumulation):
        backward(s) at w              # p.grad = g
        cram.perturb()                # saves w (and g), moves to w~, sets every .grad to None
        backward(s) at w~ (same batch)
        cram.restore()                # optional: back to w with grad = g~ + g, e.g. to clip the combined gradient
        cram.step()                   # restore() if not done yet, then the base step
    step() without a preceding perturb() is a plain base step. `param_groups` and `state` are the base's (so
    setting group["lr"] reaches it); state_dict() holds the base's state and the generator.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        rho: float = 0.05,
        sparsities: Sequence[float] = (0.5,),
        nm: Sequence[int] | Sequence[Sequence[int]] | None = None,
        plus: bool = True,
        seed: int = 0,
        masked_grad: bool = True,
    ):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        sparsities = [float(s) for s in sparsities]
        if not sparsities or not all(0.0 <= s <= 1.0 for s in sparsities):
            raise ValueError(f"sparsities must be a nonempty list of values in [0, 1], got {sparsities}")
        if nm is not None and len(nm) and isinstance(nm[0], int):
            nm = [nm]  # a single (n, m) pair
        patterns = [tuple(int(v) for v in x) for x in nm] if nm else []
        if not all(len(x) == 2 and 0 < x[0] <= x[1] for x in patterns):
            raise ValueError(f"nm must be (n, m) pairs with 0 < n <= m, got {nm}")
        self.base = base
        super().__init__(base.param_groups, dict(base.defaults))
        self._link()
        self.rho, self.sparsities, self.nm, self.plus, self.masked_grad = rho, sparsities, patterns, plus, masked_grad
        self.generator = torch.Generator().manual_seed(seed)
        self.last_choice: float | tuple[int, int] | None = None  # the sparsity or (n, m) of the latest perturb()
        self._saved: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def _link(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    def _draw(self) -> float | tuple[int, int]:
        options = self.nm or self.sparsities
        self.last_choice = options[int(torch.randint(len(options), (1,), generator=self.generator))]
        return self.last_choice

    @torch.no_grad()
    def perturb(self) -> None:
        """w -> w~ = C(w + rho * p.grad) for every parameter with a gradient; saves w (and g for CrAM+) and sets
        the gradients to None, ready for the backward pass at w~."""
        if self._saved:
            raise RuntimeError("CrAM.perturb() called twice without restore() / step() in between")
        choice = self._draw()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                saved = {"w": p.detach().clone()}
                if self.plus:
                    saved["g"] = p.grad.detach().clone()
                p.add_(p.grad.to(p.dtype), alpha=self.rho)
                keep = compression_mask(p, choice) if p.dim() >= 2 else None
                if keep is not None:
                    p.masked_fill_(~keep, 0)
                    saved["keep"] = keep
                self._saved[p] = saved
                p.grad = None

    @torch.no_grad()
    def restore(self) -> None:
        """Back to w; grad = mask(w~) * g~ (+ g for CrAM+). A no-op without a pending perturb()."""
        for p, saved in self._saved.items():
            g = p.grad  # g~, from the backward pass at w~ (None if that pass did not reach p)
            if g is not None and self.masked_grad and "keep" in saved:
                g.masked_fill_(~saved["keep"], 0)
            p.copy_(saved["w"])
            if self.plus:
                p.grad = saved["g"] if g is None else g.add_(saved["g"])
        self._saved = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """With a closure: the whole CrAM step (two closure calls), returning the loss at w. Without: finish
        the step begun by perturb() (or a plain base step)."""
        loss = None
        if closure is not None:
            if self._saved:
                raise RuntimeError("CrAM.step(closure) called after perturb(); use step() without a closure")
            with torch.enable_grad():
                loss = closure()
            self.perturb()
            with torch.enable_grad():
                closure()
        self.restore()
        self.base.step()
        return loss

    def state_dict(self) -> dict:
        if self._saved:
            raise RuntimeError("CrAM.state_dict() between perturb() and step(): the weights are perturbed")
        return {"base": self.base.state_dict(), "cram": {"generator": self.generator.get_state()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict["base"])
        self._link()  # torch's load_state_dict builds new param_groups / state objects
        self.generator.set_state(state_dict["cram"]["generator"].to(device="cpu", dtype=torch.uint8))
        self._saved = {}


@torch.no_grad()
def compression_mask(w: torch.Tensor, choice: float | tuple[int, int]) -> torch.Tensor | None:
    """Bool mask (True = kept) of C for one tensor: the top round((1 - s) * numel) |values| for a sparsity s, or
    the top n |values| of each m consecutive ones along the last dim for (n, m). None: C is the identity."""
    a = w.detach().abs()
    if isinstance(choice, tuple):
        n, m = choice
        if n >= m or w.shape[-1] % m:
            return None
        groups = a.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(n, dim=1).indices, True)
        return keep.reshape(w.shape)
    numel = w.numel()
    k = numel - int(round(choice * numel))  # entries kept
    if k >= numel:
        return None
    keep = torch.zeros(numel, dtype=torch.bool, device=w.device)
    if k > 0:
        keep[a.flatten().topk(k).indices] = True
    return keep.reshape(w.shape)


def wrap_cram(base: torch.optim.Optimizer, cfg) -> CrAM:
    """optim.cram=true: `base` wrapped per the cram section (rho, sparsities, pattern 'unstructured' | 'n:m',
    plus, seed)."""
    nm = None if cfg.pattern == "unstructured" else tuple(int(v) for v in cfg.pattern.split(":"))
    return CrAM(base, rho=cfg.rho, sparsities=cfg.sparsities, nm=nm, plus=cfg.plus, seed=cfg.seed)


@OPTIONS.register("optim.cram")
class CrAMOption(Technique):
    """optim.cram=true: two gradients per step (the clean one and at the compressed, perturbed weights)."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.optim.cram

    @classmethod
    def requires(cls, cfg) -> set[str]:
        return {"gradients_in_memory", "whole_matrices"}

    @classmethod
    def validate(cls, cfg) -> None:
        c = cfg.cram
        if c.rho <= 0:
            raise ConfigError(f"cram.rho={c.rho} must be > 0")
        if not c.sparsities or not all(0 < s < 1 for s in c.sparsities):
            raise ConfigError(f"cram.sparsities={list(c.sparsities)} must be numbers in (0, 1)")
