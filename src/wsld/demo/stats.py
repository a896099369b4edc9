"""Pure statistics of the demo's tables: mean and sample standard deviation."""

from __future__ import annotations

import math
from typing import Optional


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); no std for a single value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))

