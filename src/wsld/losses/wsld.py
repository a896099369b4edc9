"""``wsld``: Weighted Soft Label Distillation (Zhou et al., ICLR 2021), as the authors compute it.

All softmax / log-softmax maths is done in float32 whatever the autocast dtype: bf16/fp16 logits
of magnitude up to 1e4 still give finite losses and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WSLD_EPS = 1e-7  # the reference's epsilon in ce_s / (ce_t + eps)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Per-sample ``-sum_c softmax(t/T)_c * log_softmax(s/T)_c`` (float32); same gradient as KL."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    return -(p_t * log_p_s).sum(dim=1)


def teacher_entropy(teacher_logits: Tensor, T: float) -> Tensor:
    """Per-sample entropy of ``softmax(t/T)`` (float32): softCE minus this is the KL."""
    with torch.no_grad():
        log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
        return -(log_p_t.exp() * log_p_t).sum(dim=1)


def wsld_weights(student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample weight ``1 - exp(-max(CE_s / (CE_t + eps), 0))`` from un-tempered, detached logits."""
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits.detach().float(), target, reduction="none")
        ce_t = F.cross_entropy(teacher_logits.detach().float(), target, reduction="none")
        ratio = (ce_s / (ce_t + WSLD_EPS)).clamp_min(0.0)
        return 1.0 - torch.exp(-ratio)


def wsld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    T: float = 2.0,
    alpha: float = 2.5,
    label_smoothing: float = 0.0,
    weighting: str = "on",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE + alpha * T^2 * mean_i(w_i * softCE_i)``; ``weighting="off"`` fixes every ``w_i`` at 1 (the ablation).

    The soft term is in the reference's cross-entropy form, so its value (part ``soft``) includes
    the teacher's entropy (same gradient as KL); part ``soft_kl`` is the same term with the entropy
    removed, the number that goes to 0 as the student matches the teacher. No gradient flows
    through the weight ``w``.
    """
    s = student_logits.float()
    t = teacher_logits.detach().float()
    hard = F.cross_entropy(s, target, label_smoothing=label_smoothing)
    w = wsld_weights(s, t, target) if weighting == "on" else s.new_ones(s.shape[0])
    soft = (T * T) * (w * soft_cross_entropy(s, t, T)).mean()
    loss = hard + alpha * soft
    soft_kl = soft.detach() - (T * T) * (w * teacher_entropy(t, T)).mean()
    return loss, {"hard": hard.detach(), "soft": soft.detach(), "soft_kl": soft_kl, "weight_mean": w.mean(), "sample_weight": w}
