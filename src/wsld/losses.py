"""Distillation losses: ``ce`` (student alone), ``kd`` (Hinton) and ``wsld`` (Zhou et al., ICLR 2021).

Every loss has one signature, ``(student_logits, teacher_logits, target, **hyper) -> (loss, parts)``,
and is chosen by name from ``LOSSES``. ``parts`` holds detached tensors (``hard``, ``soft``,
``weight_mean``; ``wsld`` adds the per-sample ``sample_weight``) for logging; nothing here calls ``.item()``, so a step never waits on the GPU.

All softmax / log-softmax maths is done in float32 whatever the autocast dtype: bf16/fp16 logits
of magnitude up to 1e4 still give finite losses and gradients.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WSLD_EPS = 1e-7  # the reference's epsilon in ce_s / (ce_t + eps)

LossParts = dict[str, Tensor]
LossFn = Callable[..., tuple[Tensor, LossParts]]


def _hard(student_logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    return F.cross_entropy(student_logits, target, label_smoothing=label_smoothing)


def ce(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    target: Tensor,
    *,
    label_smoothing: float = 0.0,
    **_: float,
) -> tuple[Tensor, LossParts]:
    """Cross-entropy on the labels only: the "Original" row (the teacher is ignored, may be None)."""
    s = student_logits.float()
    hard = _hard(s, target, label_smoothing)
    zero = hard.new_zeros(())
    return hard, {"hard": hard.detach(), "soft": zero, "weight_mean": zero}


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Per-sample ``-sum_c softmax(t/T)_c * log_softmax(s/T)_c`` (float32); same gradient as KL."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    return -(p_t * log_p_s).sum(dim=1)


def wsld_weights(student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample weight ``1 - exp(-max(CE_s / (CE_t + eps), 0))`` from un-tempered, detached logits."""
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits.detach().float(), target, reduction="none")
        ce_t = F.cross_entropy(teacher_logits.detach().float(), target, reduction="none")
        ratio = (ce_s / (ce_t + WSLD_EPS)).clamp_min(0.0)
        return 1.0 - torch.exp(-ratio)


def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    T: float = 4.0,
    alpha: float = 0.9,
    label_smoothing: float = 0.0,
    **_: float,
) -> tuple[Tensor, LossParts]:
    """Hinton KD: ``(1 - alpha) * CE + alpha * T^2 * KL(p_t^T || p_s^T)`` (KL averaged over the batch)."""
    s = student_logits.float()
    hard = _hard(s, target, label_smoothing)
    log_p_s = F.log_softmax(s / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    soft = (T * T) * kl
    loss = (1.0 - alpha) * hard + alpha * soft
    return loss, {"hard": hard.detach(), "soft": soft.detach(), "weight_mean": hard.new_ones(())}


def wsld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    T: float = 2.0,
    alpha: float = 2.5,
    label_smoothing: float = 0.0,
    **_: float,
) -> tuple[Tensor, LossParts]:
    """Weighted Soft Label Distillation: ``CE + alpha * T^2 * mean_i(w_i * softCE_i)`` (SPEC section 1).

    The soft term is in the reference's cross-entropy form, so its value includes the teacher's
    entropy (same gradient as KL). No gradient flows through the weight ``w``.
    """
    s = student_logits.float()
    t = teacher_logits.detach().float()
    hard = _hard(s, target, label_smoothing)
    w = wsld_weights(s, t, target)
    soft = (T * T) * (w * soft_cross_entropy(s, t, T)).mean()
    loss = hard + alpha * soft
    return loss, {"hard": hard.detach(), "soft": soft.detach(), "weight_mean": w.mean(), "sample_weight": w}


LOSSES: dict[str, LossFn] = {"ce": ce, "kd": kd, "wsld": wsld}


def get_loss(name: str) -> LossFn:
    from wsld.errors import UserError

    if name not in LOSSES:
        raise UserError(f"unknown loss '{name}': choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


class DistillLoss(nn.Module):
    """Thin module around a registered loss with its hyper-parameters bound."""

    def __init__(self, name: str, T: float = 4.0, alpha: float = 2.25, label_smoothing: float = 0.0):
        super().__init__()
        self.name = name
        self.fn = get_loss(name)
        self.T, self.alpha, self.label_smoothing = float(T), float(alpha), float(label_smoothing)

    @property
    def needs_teacher(self) -> bool:
        return self.name != "ce"

    def forward(self, student_logits: Tensor, teacher_logits: Optional[Tensor], target: Tensor) -> tuple[Tensor, LossParts]:
        return self.fn(
            student_logits, teacher_logits, target, T=self.T, alpha=self.alpha, label_smoothing=self.label_smoothing
        )

    def extra_repr(self) -> str:
        return f"{self.name}, T={self.T}, alpha={self.alpha}, label_smoothing={self.label_smoothing}"


class CE(DistillLoss):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__("ce", label_smoothing=label_smoothing)


class KD(DistillLoss):
    def __init__(self, T: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0):
        super().__init__("kd", T, alpha, label_smoothing)


class WSLD(DistillLoss):
    def __init__(self, T: float = 2.0, alpha: float = 2.5, label_smoothing: float = 0.0):
        super().__init__("wsld", T, alpha, label_smoothing)
