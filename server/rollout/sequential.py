"""Anytime-valid statistics of a rollout's gates: confidence sequences that may be checked after every request.

Pure functions over counts and samples (numpy, scipy.special): no server state. Every interval here is a
confidence *sequence*: with probability >= 1 - alpha it holds at every sample size at once, so a gate may
look after each request and stop the first time it is sure, without the inflation that re-testing a
fixed-sample test causes.

The building block is Robbins' beta-binomial mixture martingale for a proportion p: after t Bernoulli
draws with s successes, M_t(p) = B(a + s, b + t - s) / B(a, b) / (p^s (1 - p)^(t - s)) has mean 1 under
the true p, so by Ville's inequality P(exists t: M_t(p) >= 1/alpha) <= alpha and {p : M_t(p) < 1/alpha}
is a confidence sequence. It is exact for Bernoulli data (no normal approximation, valid with zero
errors seen), which matters for error rates near 0. Two arms: each arm's sequence at alpha/2, the
difference bounded by their corners (a union bound). Quantiles: for the true q-quantile x, 1{X <= x}
is Bernoulli(q), so the counts that the sequence accepts at q bound x between two order statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import betaln

# Jeffreys' prior for the mixture: spends its power evenly across p, and closes near 0 and 1 faster than a uniform one.
PRIOR = (0.5, 0.5)
_BISECT_STEPS = 40  # 2^-40 of [0, 1]: far below any margin


def log_mixture(successes, trials, p, prior: tuple[float, float] = PRIOR):
    """log M_t(p): the log of the beta-binomial mixture martingale of `successes` in `trials` at proportion `p` (arrays broadcast)."""
    s = np.asarray(successes, dtype=np.float64)
    t = np.asarray(trials, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1.0 - 1e-16)
    a, b = prior
    mixture = betaln(a + s, b + t - s) - betaln(a, b)
    return mixture - (s * np.log(p) + (t - s) * np.log1p(-p))


def proportion_cs(successes, trials, alpha: float, prior: tuple[float, float] = PRIOR) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): the confidence sequence of a proportion at level 1 - alpha (arrays broadcast; no trials: [0, 1]).

    log M_t(p) is convex in p with its minimum near s/t, so each bound is found by bisection on its side.
    """
    s = np.asarray(successes, dtype=np.float64)
    t = np.asarray(trials, dtype=np.float64)
    s, t = np.broadcast_arrays(s, t)
    level = math.log(1.0 / alpha)
    centre = np.where(t > 0, (s + prior[0]) / (t + prior[0] + prior[1]), 0.5)

    def bound(inside, outside):
        # Invariant: `inside` is in the sequence (or is the centre), `outside` is out of it (or is the edge).
        inside, outside = inside.copy(), outside.copy()
        for _ in range(_BISECT_STEPS):
            middle = (inside + outside) / 2.0
            accepted = log_mixture(s, t, middle) < level
            inside = np.where(accepted, middle, inside)
            outside = np.where(accepted, outside, middle)
        return outside

    low = bound(centre, np.zeros_like(centre))
    high = bound(centre, np.ones_like(centre))
    # The edges themselves: p = 0 is possible only with no successes, p = 1 only with no failures.
    low = np.where((s == 0) | (log_mixture(s, t, 0.0) < level), 0.0, low)
    high = np.where((s == t) | (log_mixture(s, t, 1.0) < level), 1.0, high)
    return low, high


def difference_cs(events1, trials1, events0, trials0, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): a confidence sequence for rate1 - rate0 of two independent arms: each arm's at alpha / 2, their corners."""
    lo1, hi1 = proportion_cs(events1, trials1, alpha / 2)
    lo0, hi0 = proportion_cs(events0, trials0, alpha / 2)
    return lo1 - hi0, hi1 - lo0


def accepted_counts(q: float, trials: int, alpha: float, prior: tuple[float, float] = PRIOR) -> tuple[int, int]:
    """(lowest, highest) count of successes in `trials` that the sequence at proportion q still accepts."""
    if trials <= 0:
        return 0, 0
    level = math.log(1.0 / alpha)

    def accepted(count: int) -> bool:
        return bool(log_mixture(count, trials, q, prior) < level)

    # log M_t(q) is convex in the count (log-gammas less a line), so the accepted counts are one run around its
    # minimum near q * trials: two bisections find its ends in O(log trials) looks, not one per count.
    centre = min(max(round(q * trials), 0), trials)
    if not accepted(centre):  # cannot happen for a proportion inside (0, 1); kept for safety: accept everything
        return 0, trials

    def edge(inside: int, outside: int) -> int:
        while abs(outside - inside) > 1:
            middle = (inside + outside) // 2
            inside, outside = (middle, outside) if accepted(middle) else (inside, middle)
        return inside

    low = 0 if accepted(0) else edge(centre, 0)
    high = trials if accepted(trials) else edge(centre, trials)
    return low, high


def quantile_cs(samples: np.ndarray, q: float, alpha: float) -> tuple[float, float]:
    """(low, high): a confidence sequence for the q-quantile of the samples' distribution (0 and inf while too few)."""
    x = np.asarray(samples, dtype=np.float64)
    t = x.size
    lo_count, hi_count = accepted_counts(q, t, alpha)
    kth = [k for k in (lo_count - 1, hi_count) if 0 <= k < t]
    x = np.partition(x, kth) if kth else x  # the two order statistics in place: O(t), where sorting is O(t log t)
    # At least lo_count samples lie at or below the quantile, so it is >= the lo_count-th smallest; at most hi_count do,
    # so it is below the (hi_count + 1)-th smallest.
    low = float(x[lo_count - 1]) if lo_count >= 1 else 0.0
    high = float(x[hi_count]) if hi_count < t else math.inf
    return low, high


@dataclass(frozen=True)
class Verdict:
    """One gate's answer at one look: pass, fail or continue, with what it saw."""

    decision: str  # pass | fail | continue | skip
    statistic: float | None
    threshold: float
    evidence: str


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def worse_rate(canary: tuple[int, int], control: tuple[int, int], margin: float, alpha: float, what: str = "error rate") -> Verdict:
    """Is the canary's rate (events, trials) higher than the control's by more than `margin`?

    fail: the whole sequence of rate(canary) - rate(control) lies above the margin; pass: wholly below it.
    Used for errors (events = errors) and, with events = wrong answers, for accuracy from feedback.
    """
    (e1, n1), (e0, n0) = canary, control
    low, high = (float(v) for v in difference_cs(e1, n1, e0, n0, alpha))
    diff = (e1 / n1 if n1 else 0.0) - (e0 / n0 if n0 else 0.0)
    decision = "fail" if low > margin else "pass" if high < margin else "continue"
    evidence = (
        f"{what}: canary {_pct(e1 / n1) if n1 else '-'} ({e1}/{n1}), control {_pct(e0 / n0) if n0 else '-'} ({e0}/{n0}); "
        f"difference in [{low * 100:+.2f}, {high * 100:+.2f}] points (alpha {alpha:.4g}), margin {margin * 100:.2f}"
    )
    return Verdict(decision, diff, margin, evidence)


def rate_at_least(hits: int, trials: int, minimum: float, alpha: float, what: str = "agreement") -> Verdict:
    """Is a proportion (hits, trials) at least `minimum`? pass: the sequence lies at or above it; fail: wholly below."""
    low, high = (float(v) for v in proportion_cs(hits, trials, alpha))
    decision = "pass" if low >= minimum else "fail" if high < minimum else "continue"
    value = hits / trials if trials else None
    evidence = (
        f"{what} {_pct(value) if value is not None else '-'} ({hits}/{trials}), in [{_pct(low)}, {_pct(high)}] "
        f"(alpha {alpha:.4g}), minimum {_pct(minimum)}"
    )
    return Verdict(decision, value, minimum, evidence)


def slower_quantile(canary: np.ndarray, control: np.ndarray, q: float, ratio: float, alpha: float) -> Verdict:
    """Is the canary's q-quantile latency more than `ratio` times the control's?

    fail: canary's lowest plausible quantile > ratio x control's highest; pass: canary's highest <= ratio x control's lowest.
    """
    lo1, hi1 = quantile_cs(canary, q, alpha / 2)
    lo0, hi0 = quantile_cs(control, q, alpha / 2)
    decision = "fail" if lo1 > ratio * hi0 else "pass" if hi1 <= ratio * lo0 and lo0 > 0 else "continue"
    p1 = float(np.quantile(canary, q)) if len(canary) else None
    p0 = float(np.quantile(control, q)) if len(control) else None
    statistic = p1 / p0 if p1 is not None and p0 else None
    name = f"p{q * 100:g}"

    def ms(x: float) -> str:
        return "inf" if math.isinf(x) else f"{x * 1000:.3g}"

    evidence = (
        f"latency {name}: canary {ms(p1) if p1 is not None else '-'} ms in [{ms(lo1)}, {ms(hi1)}] (n={len(canary)}), "
        f"control {ms(p0) if p0 is not None else '-'} ms in [{ms(lo0)}, {ms(hi0)}] (n={len(control)}) "
        f"(alpha {alpha:.4g}); allowed ratio {ratio:g}"
    )
    return Verdict(decision, statistic, ratio, evidence)


def costlier(canary: tuple[float, int], control: tuple[float, int], ratio: float) -> Verdict:
    """Cost per 1000 inferences (device seconds, requests): a point check at the end of a stage, not a sequential test.

    Device time is only known summed over batches, so there is no per-request sample to bound; the gate
    compares the two means once the other gates are decided, and fails when the canary costs more than
    `ratio` times the control.
    """
    (d1, n1), (d0, n0) = canary, control
    if not n1 or not n0 or d0 <= 0:
        return Verdict("continue", None, ratio, "cost: not enough requests or device time measured yet")
    c1, c0 = d1 / n1 * 1000, d0 / n0 * 1000
    value = c1 / c0
    decision = "fail" if value > ratio else "pass"
    evidence = f"device seconds per 1000 inferences: canary {c1:.4g}, control {c0:.4g} (ratio {value:.3g}, allowed {ratio:g})"
    return Verdict(decision, value, ratio, evidence)
