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
from scipy.special import betaincc, betaln, ndtri

from slimserve.server.errors import InvalidArgument

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


# ---------------------------------------------------------------------------------------------- non-inferiority SPRTs
#
# The gates above test "no difference" two-sided: an equal variant is passed only when the whole confidence sequence
# has left the margin, which costs about 1.4x the requests of a fixed-horizon test. The tests below make "worse by the
# margin" the null and "equal" the alternative, Wald's sequential probability ratio test between the two points:
#
#   pass (reject "worse by the margin") when LR(equal : margin) >= 1 / alpha,
#   fail (reject "equal")               when LR(margin : equal) >= 1 / alpha.
#
# Each likelihood ratio is a martingale under its null and a supermartingale beyond it (the likelihood ratio is
# monotone in the difference), so by Ville's inequality the chance that it *ever* crosses 1 / alpha is at most alpha
# at every look and for every difference at or beyond the margin: anytime-valid, like the mixtures, by construction.
# A maximum sample size truncates the test: a stage that reaches it undecided takes one fixed-sample look at level
# alpha * TERMINAL_SHARE (the sequential boundaries spend the rest), so the error stays below alpha and an equal
# variant that wandered keeps most of its chance to pass. bench/bench_rollout.py and tests/server/test_rollout_sequential.py
# check both by simulation.

TERMINAL_SHARE = 0.2  # of alpha, spent by the one fixed-sample look at the maximum sample size
TRUNCATE_AT = 2.0  # x the information a fixed-sample test needs for 90% power on an equal variant


def _z_one_sided(alpha: float) -> float:
    return float(-ndtri(alpha))


def _levels(alpha_pass: float, alpha_fail: float) -> tuple[float, float]:
    """The log likelihood ratios at which the SPRT passes and fails: the sequential boundaries keep 1 - TERMINAL_SHARE
    of each alpha (Ville: P(ever crossing log(1 / a)) <= a), the one look at the maximum sample size the rest."""
    return math.log(1.0 / (alpha_pass * (1.0 - TERMINAL_SHARE))), math.log(1.0 / (alpha_fail * (1.0 - TERMINAL_SHARE)))


def fixed_information(margin: float, alpha: float, power: float = 0.9) -> float:
    """Information (1 / variance of the estimated difference) that a one-sided fixed-sample test at level alpha needs
    to pass an equal variant with `power`; the SPRT is truncated at TRUNCATE_AT times it."""
    return ((_z_one_sided(alpha) + _z_one_sided(1.0 - power)) / margin) ** 2


def _restricted_control_rate(e1: float, n1: float, e0: float, n0: float, margin: float) -> float:
    """The control's rate that maximizes the two arms' likelihood under rate(canary) = rate(control) + margin
    (concave along that line: bisection on its derivative). Smoothed by half an event so that no rate is 0 or 1."""
    e1, n1, e0, n0 = e1 + 0.5, n1 + 1.0, e0 + 0.5, n0 + 1.0
    low, high = 1e-9, 1.0 - margin - 1e-9
    if high <= low:
        return low
    for _ in range(60):
        p = (low + high) / 2.0
        q = p + margin
        slope = e1 / q - (n1 - e1) / (1.0 - q) + e0 / p - (n0 - e0) / (1.0 - p)
        low, high = (p, high) if slope > 0 else (low, p)
    return (low + high) / 2.0


@dataclass(frozen=True)
class RateSPRT:
    """One look of the non-inferiority SPRT of two rates: the log likelihood ratios, the information, the decision."""

    difference: float
    log_pass: float  # log LR(equal : worse by the margin); pass at log(1 / alpha)
    log_fail: float  # log LR(worse by the margin : equal); fail at log(1 / alpha)
    information: float
    max_information: float
    decision: str


def rate_sprt(e1: int, n1: int, e0: int, n0: int, margin: float, alpha: float, alpha_pass: float | None = None) -> RateSPRT:
    """Non-inferiority SPRT of rate(canary) - rate(control) (events of trials each), "worse by `margin`" against "equal".

    The difference of the two estimated rates is, to the normal approximation, Brownian in its information
    I = 1 / Var: its likelihood ratio of difference 0 against the margin m is exp(m I (m / 2 - d)). The variance is
    each hypothesis' own: at the rates restricted to the margin for the pass test, at the pooled rate for the fail test
    (as a score test does), so each ratio has mean 1 under its null. `alpha` bounds a wrong fail, `alpha_pass`
    (default: alpha) a wrong pass.
    """
    alpha_pass = alpha if alpha_pass is None else alpha_pass
    if not 0 < margin < 1:
        raise InvalidArgument(f"non-inferiority margin {margin:g} is out of range: it is a difference of rates in (0, 1)")
    for a in (alpha, alpha_pass):
        if not 0 < a < 1:
            raise InvalidArgument(f"alpha {a:g} is out of range: it is a probability in (0, 1)")
    if n1 <= 0 or n0 <= 0:
        return RateSPRT(0.0, 0.0, 0.0, 0.0, math.inf, "continue")
    d = e1 / n1 - e0 / n0
    p0 = _restricted_control_rate(e1, n1, e0, n0, margin)
    p1 = p0 + margin
    info_margin = 1.0 / (p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    pooled = min(max((e1 + e0 + 0.5) / (n1 + n0 + 1.0), 1e-9), 1 - 1e-9)
    info_equal = 1.0 / (pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n0))
    log_pass = margin * info_margin * (margin / 2.0 - d)
    log_fail = margin * info_equal * (d - margin / 2.0)
    to_pass, to_fail = _levels(alpha_pass, alpha)
    max_information = TRUNCATE_AT * fixed_information(margin, alpha_pass)
    if log_pass >= to_pass:
        decision = "pass"
    elif log_fail >= to_fail:
        decision = "fail"
    elif min(info_margin, info_equal) >= max_information:
        # the one look at the maximum sample size: a fixed-sample test at the share of alpha kept for it
        decision = "pass" if (margin - d) * math.sqrt(info_margin) >= _z_one_sided(alpha_pass * TERMINAL_SHARE) else "fail"
    else:
        decision = "continue"
    return RateSPRT(d, log_pass, log_fail, min(info_margin, info_equal), max_information, decision)


def noninferior_rate(
    canary: tuple[int, int],
    control: tuple[int, int],
    margin: float,
    alpha: float,
    what: str = "error rate",
    alpha_pass: float | None = None,
) -> Verdict:
    """The canary's rate (events, trials) against the control's: pass when shown not higher by `margin` (the SPRT
    above), fail when shown higher than equal; truncated at the maximum information. Same fields as worse_rate."""
    alpha_pass = alpha if alpha_pass is None else alpha_pass
    if margin <= 0:  # no margin, no non-inferiority: the two-sided sequence decides
        return worse_rate(canary, control, margin, alpha, what)
    (e1, n1), (e0, n0) = canary, control
    t = rate_sprt(e1, n1, e0, n0, margin, alpha, alpha_pass)
    to_pass, to_fail = _levels(alpha_pass, alpha)
    evidence = (
        f"{what}: canary {_pct(e1 / n1) if n1 else '-'} ({e1}/{n1}), control {_pct(e0 / n0) if n0 else '-'} ({e0}/{n0}); "
        f"difference {t.difference * 100:+.2f} points, margin {margin * 100:.2f}; SPRT log-ratios pass {t.log_pass:.2f} / "
        f"fail {t.log_fail:.2f}, decide at {to_pass:.2f} / {to_fail:.2f} (alpha {alpha_pass:.4g} / {alpha:.4g}), information "
        f"{min(t.information / t.max_information, 1.0):.0%} of its maximum"
    )
    return Verdict(t.decision, t.difference, margin, evidence)


def noninferior_proportion(
    hits: int, trials: int, minimum: float, alpha: float, what: str = "agreement", alpha_pass: float | None = None
) -> Verdict:
    """Is a proportion at least `minimum`? The exact Bernoulli SPRT of p = minimum (the null) against p = halfway from
    the minimum to 1 (the alternative): no normal approximation, Ville-exact; truncated like rate_sprt."""
    if minimum <= 0:  # every proportion is at least 0: the sequence passes it at once
        return rate_at_least(hits, trials, minimum, alpha, what)
    alpha_pass = alpha if alpha_pass is None else alpha_pass
    if not 0 < minimum < 1:
        raise InvalidArgument(f"minimum {minimum:g} is out of range: it is a proportion in (0, 1)")
    for a in (alpha, alpha_pass):
        if not 0 < a < 1:
            raise InvalidArgument(f"alpha {a:g} is out of range: it is a probability in (0, 1)")
    good = (1.0 + minimum) / 2.0
    up, down = math.log(good / minimum), math.log((1.0 - good) / (1.0 - minimum))
    log_pass = hits * up + (trials - hits) * down
    to_pass, to_fail = _levels(alpha_pass, alpha)
    gap = good - minimum
    max_trials = TRUNCATE_AT * fixed_information(gap, alpha_pass) * good * (1 - good)
    value = hits / trials if trials else None
    if log_pass >= to_pass:
        decision = "pass"
    elif -log_pass >= to_fail:
        decision = "fail"
    elif trials >= max_trials:
        z = (value - minimum) / math.sqrt(minimum * (1 - minimum) / trials)
        decision = "pass" if z >= _z_one_sided(alpha_pass * TERMINAL_SHARE) else "fail"
    else:
        decision = "continue"
    evidence = (
        f"{what} {_pct(value) if value is not None else '-'} ({hits}/{trials}), minimum {_pct(minimum)}; SPRT of "
        f"{_pct(minimum)} against {_pct(good)}: log-ratio {log_pass:+.2f}, passes at {to_pass:.2f}, fails at -{to_fail:.2f} "
        f"(alpha {alpha_pass:.4g} / {alpha:.4g}), "
        f"{min(trials / max_trials, 1.0):.0%} of its maximum sample"
    )
    return Verdict(decision, value, minimum, evidence)


def _log_upper_mixture(k: int, n: int, q: float) -> float:
    """log of the e-process against "P(success) <= q" after k successes in n: the likelihood ratio to q, mixed over a
    uniform prior on alternatives in (q, 1). Each alternative's ratio is a supermartingale when P <= q, so the mixture is."""
    if n == 0:
        return 0.0
    tail = float(betaincc(k + 1, n - k + 1, q))  # the prior's share of the posterior mass above q
    if tail <= 0.0:
        return -math.inf
    mixed = float(betaln(k + 1, n - k + 1)) + math.log(tail) - math.log1p(-q)
    return mixed - (k * math.log(q) + (n - k) * math.log1p(-q))


def noninferior_quantile(
    canary: np.ndarray, control: np.ndarray, q: float, ratio: float, alpha: float, alpha_pass: float | None = None
) -> Verdict:
    """Is the canary's q-quantile latency at most `ratio` times the control's? The null of the pass is "slower than
    the ratio": then a canary request is at or under ratio x the control's quantile with chance <= q. With c = ratio x
    the control's lowest plausible quantile (its sequence at alpha / 2), count the canary's requests at or under c: on
    the event that the control's sequence holds, c is at most the true bound, the count at most the count at it,
    and the mixture e-process above at most its value at the true bound, a supermartingale. Pass when it reaches
    2 / alpha: a false pass has chance <= alpha / 2 + alpha / 2 at every look. Fail as slower_quantile (the canary
    shown slower than the ratio), at `alpha`; the pass at `alpha_pass` (default: alpha)."""
    alpha_pass = alpha if alpha_pass is None else alpha_pass
    if not 0 < q < 1 or ratio < 1:
        raise InvalidArgument(f"latency gate: quantile {q:g} must be in (0, 1) and ratio {ratio:g} >= 1")
    for a in (alpha, alpha_pass):
        if not 0 < a < 1:
            raise InvalidArgument(f"alpha {a:g} is out of range: it is a probability in (0, 1)")
    old = slower_quantile(canary, control, q, ratio, alpha)
    if old.decision == "fail":
        return old
    lo0, _ = quantile_cs(control, q, alpha_pass / 2)
    x = np.asarray(canary, dtype=np.float64)
    under = int(np.count_nonzero(x <= ratio * lo0)) if lo0 > 0 else 0
    log_e = _log_upper_mixture(under, x.size, q)
    level = math.log(2.0 / alpha_pass)
    decision = "pass" if log_e >= level else "continue"
    name = f"p{q * 100:g}"
    evidence = (
        f"{old.evidence}; non-inferiority: {under} of {x.size} canary requests within {ratio:g} x the control's lowest "
        f"plausible {name} ({lo0 * 1000:.3g} ms), log e-value {log_e:.2f} of {level:.2f}"
    )
    return Verdict(decision, old.statistic, ratio, evidence)
