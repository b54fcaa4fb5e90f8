"""Significance tests of a candidate variant against the baseline: Wilson intervals, Mann-Whitney, two proportions, verdicts.

Only numpy and the standard library, so that the server needs no scipy (the tests check our
Mann-Whitney against scipy's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

MIN_SAMPLES = 30  # below this, neither test's normal approximation is worth a verdict
ALPHA = 0.05


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _two_sided(z: float) -> float:
    return min(1.0, math.erfc(abs(z) / math.sqrt(2)))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when n == 0 (nothing is known)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    # The bounds are exact at the edges; floating point would leave 1e-17 there.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _mann_whitney(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(U of a, two-sided p): normal approximation with tie and continuity corrections, as scipy's asymptotic method."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        raise ValueError(f"both samples need values, got {n1} and {n2}")
    both = np.concatenate([a, b])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2.0)[inverse]  # average rank of each tie group, 1-based
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    ties = float((counts.astype(np.float64) ** 3 - counts).sum())
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return u1, 1.0  # every value equal: no evidence of a shift
    mu = n1 * n2 / 2.0
    u = max(u1, n1 * n2 - u1)
    z = (u - mu - 0.5) / math.sqrt(variance)
    return u1, _two_sided(z)


def mann_whitney(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sided p-value that samples a and b come from the same distribution (Mann-Whitney U)."""
    return _mann_whitney(a, b)[1]


def two_proportion_test(s1: int, n1: int, s2: int, n2: int) -> float:
    """Two-sided p-value that two success rates are equal.

    The pooled two-proportion z-test: closed form and instant, and at the >= MIN_SAMPLES labels we
    require before a verdict it agrees with a bootstrap to within the rounding we print.
    """
    for s, n in ((s1, n1), (s2, n2)):
        if n < 0 or not 0 <= s <= n:
            raise ValueError(f"need 0 <= successes <= n, got successes={s}, n={n}")
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = (s1 + s2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        return 1.0  # both all right or both all wrong
    return _two_sided((s1 / n1 - s2 / n2) / math.sqrt(variance))


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def verdict(
    p_value: float | None,
    better: bool,
    n: int,
    *,
    better_word: str,
    worse_word: str,
    min_n: int = MIN_SAMPLES,
    alpha: float = ALPHA,
) -> str:
    """A short reading of a test against the baseline: "faster (p<0.001)", "no significant difference (p=0.41)",
    "not enough data (n=12 < 30)". `n` is the smaller of the two samples; `better` the direction observed."""
    if n < min_n or p_value is None:
        return f"not enough data (n={n} < {min_n})"
    if p_value < alpha:
        return f"{better_word if better else worse_word} ({format_p(p_value)})"
    return f"no significant difference ({format_p(p_value)})"


def latency_verdict(baseline: Sequence[float] | np.ndarray, candidate: Sequence[float] | np.ndarray, **kwargs: Any) -> str:
    """Faster or slower than the baseline by the Mann-Whitney test on request latencies."""
    n = min(len(baseline), len(candidate))
    if n < kwargs.get("min_n", MIN_SAMPLES):
        return verdict(None, False, n, better_word="faster", worse_word="slower", **kwargs)
    u_candidate, p = _mann_whitney(candidate, baseline)
    # U of the candidate below half the pairs: its latencies tend to be the smaller ones.
    faster = u_candidate < len(candidate) * len(baseline) / 2.0
    return verdict(p, faster, n, better_word="faster", worse_word="slower", **kwargs)


def accuracy_verdict(correct_baseline: int, n_baseline: int, correct: int, n: int, **kwargs: Any) -> str:
    """More or less accurate than the baseline on labelled live traffic, by the two-proportion test."""
    smaller = min(n_baseline, n)
    if smaller < kwargs.get("min_n", MIN_SAMPLES):
        return verdict(None, False, smaller, better_word="more accurate", worse_word="less accurate", **kwargs)
    p = two_proportion_test(correct_baseline, n_baseline, correct, n)
    more = correct / n > correct_baseline / n_baseline
    return verdict(p, more, smaller, better_word="more accurate", worse_word="less accurate", **kwargs)
