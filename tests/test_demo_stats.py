"""The demo's statistics against hand-computed cases: sample std, t quantiles, paired 95% CIs and their sentences."""

from __future__ import annotations

import math

import pytest

from wsld.demo.stats import T975, ci_sentence, mean_std, paired_ci, t975


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sum of squares 2, / (n - 1) = 1
    assert mean_std([5.0]) == (5.0, None)


def test_t_quantiles_match_scipy_and_known_values():
    scipy_stats = pytest.importorskip("scipy.stats")  # scikit-learn (a dependency) brings SciPy
    assert len(T975) == 30
    for df in range(1, 31):
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-6)
    for df in (31, 45, 120, 1000):  # the expansion above the table
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-4)
    assert t975(2) == 4.302653 and t975(1) == 12.706205
    with pytest.raises(ValueError):
        t975(0)


def test_paired_ci_hand_computed_no_detectable_difference():
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t_{0.975,2} = 4.302653 -> half width 2.484138
    ci = paired_ci([1.0, 2.0, 3.0])
    assert (ci["mean"], ci["std"], ci["n"], ci["t"]) == (2.0, 1.0, 3, 4.302653)
    half = 4.302653 / math.sqrt(3)
    assert half == pytest.approx(2.484138, abs=1e-6)
    assert ci["low"] == pytest.approx(2.0 - 2.484138, abs=1e-6) and ci["high"] == pytest.approx(4.484138, abs=1e-6)
    assert ci["detectable"] is False
    assert ci_sentence("WSLD", "KD", ci) == "WSLD is ahead of KD by 2.00 points, 95% CI [-0.48, +4.48]: no detectable difference at 3 seeds."


def test_paired_ci_hand_computed_difference():
    # -2.0, -2.5, -3.0: mean -2.5, sd 0.5, half width 4.302653 * 0.5 / sqrt(3) = 1.242069
    ci = paired_ci([-2.0, -2.5, -3.0])
    assert ci["mean"] == pytest.approx(-2.5) and ci["std"] == pytest.approx(0.5)
    assert ci["low"] == pytest.approx(-3.742069, abs=1e-6) and ci["high"] == pytest.approx(-1.257931, abs=1e-6)
    assert ci["detectable"] is True
    assert ci_sentence("WSLD", "CE", ci) == "WSLD is behind CE by 2.50 points, 95% CI [-3.74, -1.26]: a difference at 3 seeds."


def test_one_seed_has_no_interval():
    ci = paired_ci([0.7])
    assert ci["low"] is None and ci["detectable"] is None and ci["std"] is None
    assert ci_sentence("WSLD", "CE", ci) == "WSLD is ahead of CE by 0.70 points (1 seed: no confidence interval from a single seed)."
