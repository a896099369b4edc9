"""``ce``: cross-entropy on the labels alone, the "Original" row of the reference table."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def ce(
    student_logits: Tensor, teacher_logits: Optional[Tensor], target: Tensor, *, label_smoothing: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy on the labels only (the teacher is ignored, may be None).

    ``soft``, ``soft_kl`` and ``weight_mean`` are logged as 0 so ce runs' logs line up with kd and wsld runs'.
    """
    hard = F.cross_entropy(student_logits.float(), target, label_smoothing=label_smoothing)
    zero = hard.new_zeros(())
    return hard, {"hard": hard.detach(), "soft": zero, "soft_kl": zero, "weight_mean": zero}
