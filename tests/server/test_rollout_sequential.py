"""The rollout's anytime-valid statistics (server/rollout/sequential.py): error rates measured by simulation, looking after
every request, stay within alpha; a clearly worse canary fails within a few hundred requests."""

from __future__ import annotations

import math
from bisect import insort

import numpy as np
import pytest

from slimserve.server.rollout.sequential import (
    accepted_counts,
    costlier,
    difference_cs,
    log_mixture,
    proportion_cs,
    quantile_cs,
    rate_at_least,
    slower_quantile,
    worse_rate,
)

ALPHA = 0.05
ROLLOUTS = 200


def test_the_proportion_sequence_covers_the_truth_at_every_look_in_at_least_1_minus_alpha_of_runs():
    """Miscoverage at any of 2000 looks is exactly M_t(p) >= 1/alpha. Ville bounds it by alpha; measured (2000 runs per rate,
    so that sampling noise, +-0.5 points, stays below the gap) it is 0.8% at p=0.001, 2.8% at 0.02, 4.1% at 0.3."""
    rng = np.random.default_rng(7)
    t = np.arange(1, 2001)
    for p in (0.001, 0.02, 0.3, 0.9):
        draws = rng.random((2000, t.size)) < p
        s = np.cumsum(draws, axis=1)
        ever_out = (log_mixture(s, t, p) >= math.log(1 / ALPHA)).any(axis=1)
        assert ever_out.mean() <= ALPHA, f"p={p}: the truth left the sequence in {ever_out.mean():.1%} of runs"


def test_the_sequence_is_an_interval_around_the_estimate_and_shrinks():
    low, high = proportion_cs(50, 100, ALPHA)
    assert 0.3 < low < 0.5 < high < 0.7
    low2, high2 = proportion_cs(500, 1000, ALPHA)
    assert low < low2 < 0.5 < high2 < high
    assert proportion_cs(0, 100, ALPHA)[0] == 0 and proportion_cs(100, 100, ALPHA)[1] == 1
    assert tuple(map(float, proportion_cs(0, 0, ALPHA))) == (0.0, 1.0)  # no data: anything


def test_error_gate_false_fail_and_false_pass_stay_below_alpha_when_checked_after_every_request():
    """200 simulated arms per case, a look after every canary request (the control gets 19 per canary request):
    equal error rates never fail a 1-point margin more than alpha of the time; a canary worse by 1.5 points
    (beyond the margin) passes at most alpha of the time."""
    rng = np.random.default_rng(11)
    looks = np.arange(1, 1501)

    def run(p_canary: float, p_control: float) -> tuple[float, float]:
        e1 = np.cumsum(rng.random((ROLLOUTS, looks.size)) < p_canary, axis=1)
        e0 = np.cumsum(rng.binomial(19, p_control, (ROLLOUTS, looks.size)), axis=1)
        low, high = difference_cs(e1, looks, e0, 19 * looks, ALPHA)  # every look of every run at once
        never = looks.size
        first_fail = np.where((low > 0.01).any(axis=1), (low > 0.01).argmax(axis=1), never)
        first_pass = np.where((high < 0.01).any(axis=1), (high < 0.01).argmax(axis=1), never)
        return float(np.mean(first_fail < first_pass)), float(np.mean(first_pass < first_fail))

    false_fail, _ = run(0.02, 0.02)
    assert false_fail <= ALPHA
    _, false_pass = run(0.035, 0.02)
    assert false_pass <= ALPHA
    worse_fail, _ = run(0.10, 0.02)
    assert worse_fail >= 0.9  # 8 points worse is caught within 1500 canary requests


def _latency_runs(rng, slow: float, ratio: float, n: int = 800) -> tuple[float, float, list[int]]:
    """Rates of fail and pass of the p50 gate, looking after every request, over 200 runs; lognormal latencies."""
    table = {t: accepted_counts(0.5, t, ALPHA / 2) for t in range(1, n + 1)}
    fails = passes = 0
    when = []
    for _ in range(ROLLOUTS):
        canary, control = [], []
        a = rng.lognormal(0.0, 0.5, n) * slow
        b = rng.lognormal(0.0, 0.5, n)
        for t in range(1, n + 1):
            insort(canary, a[t - 1])
            insort(control, b[t - 1])
            lo_c, hi_c = table[t]
            lo1 = canary[lo_c - 1] if lo_c else 0.0
            hi1 = canary[hi_c] if hi_c < t else math.inf
            lo0 = control[lo_c - 1] if lo_c else 0.0
            hi0 = control[hi_c] if hi_c < t else math.inf
            if lo1 > ratio * hi0:
                fails += 1
                when.append(t)
                break
            if hi1 <= ratio * lo0:
                passes += 1
                break
    return fails / ROLLOUTS, passes / ROLLOUTS, when


def test_latency_gate_false_fail_and_false_pass_stay_below_alpha_when_checked_after_every_request():
    rng = np.random.default_rng(5)
    false_fail, _, _ = _latency_runs(rng, slow=1.0, ratio=1.0)  # equal: the hardest null for a fail
    assert false_fail <= ALPHA
    _, false_pass, _ = _latency_runs(rng, slow=1.2, ratio=1.2)  # exactly the allowed ratio slower: must not pass
    assert false_pass <= ALPHA
    fails, _, when = _latency_runs(rng, slow=2.0, ratio=1.2)  # twice as slow: caught fast
    assert fails >= 0.95 and np.median(when) < 150


def test_quantile_sequence_bounds_the_quantile_by_order_statistics():
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, 5000)
    low, high = quantile_cs(x, 0.5, ALPHA)
    assert low < math.log(2) < high and high - low < 0.15
    assert quantile_cs(x[:5], 0.99, ALPHA)[1] == math.inf  # five samples say nothing of a p99


def test_verdicts_carry_statistic_threshold_and_evidence():
    v = worse_rate((40, 400), (10, 4000), 0.01, ALPHA)
    assert v.decision == "fail" and v.statistic == pytest.approx(0.1 - 0.0025) and v.threshold == 0.01
    assert "40/400" in v.evidence and "margin 1.00" in v.evidence
    assert worse_rate((0, 3000), (0, 30000), 0.01, ALPHA).decision == "pass"
    assert worse_rate((1, 10), (0, 100), 0.01, ALPHA).decision == "continue"
    assert rate_at_least(990, 1000, 0.95, ALPHA).decision == "pass"
    assert rate_at_least(700, 1000, 0.95, ALPHA).decision == "fail"
    assert rate_at_least(9, 10, 0.95, ALPHA).decision == "continue"
    rng = np.random.default_rng(1)
    slow = slower_quantile(rng.lognormal(0, 0.2, 300) * 3, rng.lognormal(0, 0.2, 3000), 0.5, 1.2, ALPHA)
    assert slow.decision == "fail" and slow.statistic == pytest.approx(3, rel=0.1) and "allowed ratio 1.2" in slow.evidence
    assert costlier((2.0, 1000), (1.0, 1000), 1.25).decision == "fail"
    assert costlier((1.1, 1000), (1.0, 1000), 1.25).decision == "pass"
    assert costlier((1.0, 0), (1.0, 1000), 1.25).decision == "continue"


def test_accepted_counts_by_bisection_are_the_counts_the_sequence_accepts():
    """The two bisections find the same run of counts as testing every count (the convexity they rely on holds)."""
    from slimserve.server.rollout.sequential import log_mixture

    for trials in (1, 2, 7, 100, 2500):
        for q in (0.01, 0.5, 0.9, 0.99):
            for alpha in (0.3, 0.05, 0.001):
                ok = np.flatnonzero(log_mixture(np.arange(trials + 1), trials, q) < math.log(1 / alpha))
                assert accepted_counts(q, trials, alpha) == (int(ok[0]), int(ok[-1])), (trials, q, alpha)
