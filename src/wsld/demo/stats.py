"""Pure statistics of the demo's tables: mean ± sample std, t quantiles, paired 95% confidence intervals, their sentences."""

from __future__ import annotations

import math
from typing import Any, Optional

# t_{0.975, df}: the two-sided 95% quantile of Student's t for df = 1..30 (the test checks them
# against SciPy); above 30 an expansion around the normal quantile, good to 1e-4
T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip
Z975 = 1.959964


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); no std for a single value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975  # Cornish-Fisher expansion of t around z
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_ci(diffs: list[float]) -> dict[str, Any]:
    """Mean of paired differences with its 95% CI from the t distribution (none for one pair).

    ``detectable``: whether the interval excludes 0 (None without an interval).
    """
    n = len(diffs)
    m, sd = mean_std(diffs)
    out: dict[str, Any] = {"mean": m, "std": sd, "n": n, "per_seed": list(diffs), "low": None, "high": None,
                           "t": None, "detectable": None}  # fmt: skip
    if sd is not None:
        t = t975(n - 1)
        half = t * sd / math.sqrt(n)
        out.update(t=t, low=m - half, high=m + half, detectable=not (m - half <= 0.0 <= m + half))
    return out


def ci_sentence(name: str, other: str, ci: dict[str, Any]) -> str:
    """``WSLD is ahead of KD by 1.20 points, 95% CI [0.10, 2.30]: a difference at 3 seeds.``"""
    m, n = ci["mean"], ci["n"]
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    if m > 0:
        head = f"{name} is ahead of {other} by {m:.2f} points"
    elif m < 0:
        head = f"{name} is behind {other} by {-m:.2f} points"
    else:
        head = f"{name} and {other} are level"
    if ci["low"] is None:
        return f"{head} ({seeds}: no confidence interval from a single seed)."
    verdict = "a difference" if ci["detectable"] else "no detectable difference"
    return f"{head}, 95% CI [{ci['low']:+.2f}, {ci['high']:+.2f}]: {verdict} at {seeds}."
