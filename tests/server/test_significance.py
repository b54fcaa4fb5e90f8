"""Significance tests against the baseline: Wilson intervals, Mann-Whitney (checked against scipy), two proportions, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.server.telemetry.significance import (
    accuracy_verdict,
    latency_verdict,
    mann_whitney,
    two_proportion_test,
    verdict,
    wilson_interval,
)


def test_wilson_interval_known_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3)
    assert high == pytest.approx(0.5962, abs=1e-3)
    low99, high99 = wilson_interval(50, 100, confidence=0.99)
    assert low99 < low and high99 > high
    none_low, none_high = wilson_interval(0, 10)
    assert none_low == 0.0 and none_high == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mann_whitney_detects_a_clear_shift_and_not_identical_distributions():
    rng = np.random.default_rng(0)
    fast = rng.lognormal(np.log(0.002), 0.3, 400)
    slow = rng.lognormal(np.log(0.003), 0.3, 400)
    assert mann_whitney(fast, slow) < 0.001
    same_a = rng.lognormal(np.log(0.002), 0.3, 400)
    same_b = rng.lognormal(np.log(0.002), 0.3, 400)
    assert mann_whitney(same_a, same_b) > 0.05
    assert mann_whitney([1.0] * 50, [1.0] * 50) == 1.0


def test_mann_whitney_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounding makes ties
    b = np.round(rng.normal(1.2, 1.0, 250), 1)
    expected = scipy_stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue
    assert mann_whitney(a, b) == pytest.approx(expected, rel=1e-9)


def test_two_proportion_test():
    assert two_proportion_test(80, 100, 90, 100) == pytest.approx(0.0477, abs=1e-3)
    assert two_proportion_test(50, 100, 50, 100) == pytest.approx(1.0)
    assert two_proportion_test(100, 100, 100, 100) == 1.0


def test_verdict_strings():
    assert verdict(0.0001, True, 100, better_word="faster", worse_word="slower") == "faster (p<0.001)"
    assert verdict(0.01, False, 100, better_word="faster", worse_word="slower") == "slower (p=0.01)"
    assert verdict(0.41, True, 100, better_word="faster", worse_word="slower") == "no significant difference (p=0.41)"
    assert verdict(0.0001, True, 12, better_word="faster", worse_word="slower") == "not enough data (n=12 < 30)"


def test_latency_and_accuracy_verdicts_pick_the_direction():
    rng = np.random.default_rng(2)
    base = rng.lognormal(np.log(0.004), 0.2, 300)
    quick = rng.lognormal(np.log(0.002), 0.2, 300)
    assert latency_verdict(base, quick) == "faster (p<0.001)"
    assert latency_verdict(quick, base) == "slower (p<0.001)"
    assert accuracy_verdict(900, 1000, 800, 1000) == "less accurate (p<0.001)"
    assert accuracy_verdict(800, 1000, 900, 1000) == "more accurate (p<0.001)"
