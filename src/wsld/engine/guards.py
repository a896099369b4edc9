"""Guards that stop a run rather than let it go silently wrong: a diverged loss or weights, a teacher near chance."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from wsld.errors import UserError

# a teacher whose val top-1 is below chance + this many points stops the run (distill.allow_weak_teacher)
WEAK_TEACHER_MARGIN = 5.0


class TrainingDiverged(UserError):
    """Loss or weights became NaN/Inf (nan_policy=stop, or weights that cannot be checkpointed)."""

    exit_code = 3


def weights_finite(*models: Optional[nn.Module]) -> bool:
    return all(
        bool(torch.isfinite(v).all()) for m in models if m is not None for v in m.state_dict().values() if v.is_floating_point()
    )


def check_teacher_strength(top1: float, num_classes: int, allow_weak: bool, say: Callable[[str], None]) -> None:
    """Stop before distilling from a teacher near chance (wrong weights, wrong class order)."""
    chance = 100.0 / num_classes
    if top1 >= chance + WEAK_TEACHER_MARGIN:
        return
    what = (f"the teacher's val top-1 is {top1:.2f}%, within {WEAK_TEACHER_MARGIN:g} points of chance "
            f"({chance:.2f}% for {num_classes} classes): its soft labels would teach noise")  # fmt: skip
    if allow_weak:
        say(f"WARNING: {what}; distilling anyway (distill.allow_weak_teacher=true)")
        return
    raise UserError(f"{what}. Check model.teacher_weights and the class order (data.reference_labels), or set distill.allow_weak_teacher=true")
