"""Recovery losses for fine-tuning a pruned student against its dense teacher.

    total = ce * CE_sum + kd * KD_sum + feature * SquareHead * n_targets

CE_sum is `loss.lm_loss_sum`; KD_sum = sum over target tokens of T^2 * KL(p_teacher || p_student),
p = softmax(logits / T) (Hinton et al. 2015); SquareHead (Kurtic et al. 2023) = mean over decoder layers l of
||h_s^l - h_t^l||^2 / ||h_t^l||^2 over all tokens (the paper sums over layers: a factor n_layers, left to `feature`).
Every term is a sum over target tokens (SquareHead is scaled by the micro-batch's target count), so the trainer's
division by the global target count gives ce * CE_mean + kd * KD_mean + feature * SquareHead (target-weighted).

Memory: the KD logits are built `chunk_tokens` rows at a time, each chunk checkpointed (recomputed in backward,
teacher head included), so only (chunk, V) student and teacher logits exist at once, as in lm_loss_sum's generic path.
The teacher is a plain object, not a submodule: DDP, `.train()` and `state_dict()` of the loss never see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slimtune.registry import OPTIONS
from slimtune.technique import Technique
from slimtune.lm_loss import IGNORE, LogitTransform, count_targets, lm_loss_sum, logit_transform, position_kwargs


def _kd_chunk(
    head_s: nn.Module,
    head_t: nn.Module,
    hs: torch.Tensor,
    ht: torch.Tensor,
    temperature: float,
    transform_s: LogitTransform,
    transform_t: LogitTransform,
) -> torch.Tensor:
    """T^2 * sum over rows of KL(softmax(t / T) || softmax(s / T)), in fp32."""
    with torch.no_grad():
        log_p = F.log_softmax(transform_t(head_t(ht).float()) / temperature, dim=-1)
    log_q = F.log_softmax(transform_s(head_s(hs).float()) / temperature, dim=-1)
    # kl_div(input=log q, target=log p, log_target) = sum p * (log p - log q)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) * temperature**2


def kd_loss_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head_s: nn.Module,
    head_t: nn.Module,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
    transform_s: LogitTransform = LogitTransform(),
    transform_t: LogitTransform = LogitTransform(),
) -> torch.Tensor:
    """Summed logit distillation over target tokens; hidden states (B, T, H) are the final (normed) ones.

    Same alignment as lm_loss_sum: position t is scored where labels[t + 1] != IGNORE. chunk_tokens <= 0: one
    chunk. Returns a 0-d fp32 tensor (divide by the target count yourself). No gradient reaches the teacher.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} differ in batch or sequence length"
        )
    keep = labels[:, 1:].reshape(-1) != IGNORE
    hs = student_hidden[:, :-1].reshape(-1, student_hidden.shape[-1])[keep]
    ht = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])[keep].detach()
    if hs.shape[0] == 0:
        return student_hidden.sum() * 0.0
    args = (temperature, transform_s, transform_t)
    if chunk_tokens <= 0:
        return _kd_chunk(head_s, head_t, hs, ht, *args)
    total = torch.zeros((), dtype=torch.float32, device=hs.device)
    for s in range(0, hs.shape[0], chunk_tokens):
        hc, tc = hs[s : s + chunk_tokens], ht[s : s + chunk_tokens]
        if torch.is_grad_enabled():  # keep no (chunk, V) tensor for backward: recompute it there
            total = total + checkpoint(_kd_chunk, head_s, head_t, hc, tc, *args, use_reentrant=False)
        else:
            total = total + _kd_chunk(head_s, head_t, hc, tc, *args)
    return total


def squarehead_loss(
    student_states: list[torch.Tensor],
    teacher_states: list[torch.Tensor],
    mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Mean over layers of ||h_s - h_t||^2 / ||h_t||^2 (squared Frobenius norms over tokens x hidden), in fp32.

    states: one (B, T, H) tensor per layer; mask: optional (B, T) bool, True = token counted. The teacher side is
    detached. eps only guards an all-zero teacher state.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(
            f"need the same nonzero number of layers, got {len(student_states)} student and "
            f"{len(teacher_states)} teacher states"
        )
    ratios = []
    for hs, ht in zip(student_states, teacher_states):
        hs, ht = hs.float(), ht.detach().float().to(hs.device)
        if mask is not None:
            hs, ht = hs[mask], ht[mask]
        ratios.append((hs - ht).pow(2).sum() / ht.pow(2).sum().clamp_min(eps))
    return torch.stack(ratios).mean()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (model.get_decoder().layers)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}'s decoder has no `layers` list to capture outputs from")
    return layers


@contextlib.contextmanager
def capture_layer_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, each decoder layer's output (output[0] for a tuple) is appended to the yielded list, in
    call order. The hooks are removed on exit, so an activation-checkpoint recompute in backward appends nothing."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class Teacher:
    """A frozen teacher: eval mode, no parameter requires grad, used only under no_grad. Any nn.Module causal LM
    (an NF4-quantized one too). Deliberately not an nn.Module, so a loss module holding it does not register it."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        model.requires_grad_(False)
        self.transform = logit_transform(model.config)
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @torch.no_grad()
    def hidden_states(
        self, input_ids: torch.Tensor, layers: bool = True, position_ids: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(per-layer outputs, or [] when layers=False; final normed hidden state), each (B, T, H)."""
        self.model.eval()  # stays frozen even if someone called .train() on it
        kw = {k: v.to(self.device) for k, v in position_kwargs(position_ids).items()}
        with capture_layer_outputs(self.model) if layers else contextlib.nullcontext([]) as outputs:
            final = self.model.get_decoder()(
                input_ids=input_ids.to(self.device), use_cache=False, **kw
            ).last_hidden_state
        return list(outputs), final


class RecoveryLoss(nn.Module):
    """Drop-in for loss.CausalLMLoss: (input_ids, labels) -> summed loss (see the module docstring).

    Only terms with a nonzero weight are computed; kd = feature = 0 runs no teacher forward and equals
    CausalLMLoss. `last` holds the detached summed terms of the latest forward (for logging).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Teacher | None,
        ce: float = 1.0,
        kd: float = 0.0,
        feature: float = 0.0,
        temperature: float = 1.0,
        chunk_tokens: int = 0,
        before_head=None,
    ):
        """before_head(head module): as in CausalLMLoss, called before the student's head weight is read."""
        super().__init__()
        if min(ce, kd, feature) < 0 or ce == kd == feature == 0:
            raise ValueError(f"loss weights must be >= 0 and not all 0, got ce={ce}, kd={kd}, feature={feature}")
        if (kd or feature) and teacher is None:
            raise ValueError(f"kd={kd} / feature={feature} need a teacher")
        if teacher is not None and not isinstance(teacher, Teacher):
            teacher = Teacher(teacher)
        self.model = student
        self.teacher = teacher
        self.ce, self.kd, self.feature = float(ce), float(kd), float(feature)
        self.temperature = float(temperature)
        self.chunk_tokens = chunk_tokens
        self.transform = logit_transform(student.config)
        self.before_head = before_head
        self.last: dict[str, torch.Tensor] = {}

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        use_teacher = bool(self.kd or self.feature)
        with capture_layer_outputs(self.model) if self.feature else contextlib.nullcontext([]) as student_states:
            hidden = self.model.get_decoder()(
                input_ids=input_ids, use_cache=False, **position_kwargs(position_ids)
            ).last_hidden_state
        student_states = list(student_states)
        if use_teacher:
            teacher_states, teacher_hidden = self.teacher.hidden_states(input_ids, bool(self.feature), position_ids)
        head = self.model.get_output_embeddings()
        if self.before_head is not None:
            self.before_head(head)
        terms: dict[str, torch.Tensor] = {}
        if self.ce:
            terms["ce"] = lm_loss_sum(hidden, head, labels, self.chunk_tokens, self.transform)
        if self.kd:
            terms["kd"] = kd_loss_sum(
                hidden,
                teacher_hidden.to(hidden.device),
                head,
                self.teacher.head,
                labels,
                self.temperature,
                self.chunk_tokens,
                self.transform,
                self.teacher.transform,
            )
        if self.feature:
            # x n_targets: after the trainer's division by the target count this is the plain SquareHead value
            terms["feature"] = squarehead_loss(student_states, teacher_states) * count_targets(labels)
        weights = {"ce": self.ce, "kd": self.kd, "feature": self.feature}
        total = sum(weights[k] * v for k, v in terms.items())
        self.last = {k: v.detach() for k, v in terms.items()}
        return total


@OPTIONS.register("recover.kd")
class Distillation(Technique):
    """recover.kd / recover.feature > 0: the dense teacher runs beside the student."""

    @staticmethod
    def active(cfg, world: int) -> bool:
        return cfg.recover.kd > 0 or cfg.recover.feature > 0

    @staticmethod
    def shown(cfg, world: int) -> str:
        return f"{cfg.recover.kd} (recover.feature={cfg.recover.feature})"

    @classmethod
    def withholds(cls, cfg) -> set[str]:
        return {"streamable"}
