"""Live statistics of variants: latency windows, online accuracy from feedback, significance tests, and compare rows.

Pure domain code: no gRPC, no Prometheus. Only numpy and the standard library, so that the
server needs no scipy (the tests check our Mann-Whitney against scipy's).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from server.errors import InvalidArgument, NotFound

BASELINE = "baseline"
MIN_SAMPLES = 30  # below this, neither test's normal approximation is worth a verdict
ALPHA = 0.05
DEFAULT_WINDOW = 10_000
DEFAULT_FEEDBACK_IDS = 100_000


# ---------------------------------------------------------------------- latency


class LatencyWindow:
    """The last `capacity` request latencies (seconds) and batch sizes of one variant; thread-safe, O(1) record."""

    def __init__(self, capacity: int = DEFAULT_WINDOW) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._latency = [0.0] * capacity
        self._batch = [0] * capacity
        self._next = 0  # next slot to write
        self._total = 0  # requests recorded since creation
        self._lock = threading.Lock()

    def record(self, latency_s: float, batch_size: int = 1) -> None:
        """One answered request: its latency and the size of the batch it was computed in."""
        with self._lock:
            i = self._next
            self._latency[i] = latency_s
            self._batch[i] = batch_size
            self._next = 0 if i + 1 == self.capacity else i + 1
            self._total += 1

    @property
    def count(self) -> int:
        """Samples in the window (what percentiles and tests see), at most `capacity`."""
        return min(self._total, self.capacity)

    @property
    def total(self) -> int:
        """Requests recorded since creation, including those that left the window."""
        return self._total

    def latencies(self) -> np.ndarray:
        """A copy of the window's latencies in seconds (order not meaningful)."""
        with self._lock:
            n = min(self._total, self.capacity)
            return np.array(self._latency[:n], dtype=np.float64)

    def percentiles(self, ps: Iterable[float] = (50, 90, 99)) -> dict[float, float | None]:
        """{p: latency in seconds} over the window; None for each p while the window is empty."""
        ps = list(ps)
        samples = self.latencies()
        if samples.size == 0:
            return {p: None for p in ps}
        values = np.percentile(samples, ps)
        return {p: float(v) for p, v in zip(ps, values)}

    @property
    def mean_batch(self) -> float | None:
        with self._lock:
            n = min(self._total, self.capacity)
            return sum(self._batch[:n]) / n if n else None


# ---------------------------------------------------------------------- feedback


@dataclass
class _Answer:
    variant: str
    predicted: int
    shadows: dict[str, int] = field(default_factory=dict)
    label: int | None = None


@dataclass(frozen=True)
class FeedbackResult:
    """What a label said about the request's answer."""

    variant: str
    correct: bool


@dataclass
class _Tally:
    labelled: int = 0
    correct: int = 0


class FeedbackStore:
    """Answers of the last `capacity` requests by id, the labels sent for them, and the running tallies.

    Online accuracy per variant = correct / labelled, counted when a label arrives (shadows are
    scored too: the label is the truth for the input they saw). Shadow agreement = share of mirrored
    requests where the shadow's top-1 equalled the primary's, counted when the shadow answers,
    label or not. Tallies are totals since creation; only the id -> answer memory is bounded.
    """

    def __init__(self, capacity: int = DEFAULT_FEEDBACK_IDS) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._accuracy: dict[str, _Tally] = {}
        self._mirrored: dict[str, int] = {}
        self._agreed: dict[str, int] = {}
        self._lock = threading.Lock()

    def record_prediction(
        self, request_id: str, variant: str, predicted_class: int, shadows: Mapping[str, int] | None = None
    ) -> None:
        """The primary's top-1 for a request and, where already known, each shadow's."""
        answer = _Answer(variant, int(predicted_class))
        with self._lock:
            if request_id in self._answers:
                del self._answers[request_id]  # a reused id: the newest answer is the one a label refers to
            self._answers[request_id] = answer
            if len(self._answers) > self.capacity:
                self._answers.popitem(last=False)
            for shadow, predicted in (shadows or {}).items():
                self._add_shadow(answer, shadow, int(predicted))

    def record_shadow(self, request_id: str, shadow: str, predicted_class: int) -> bool:
        """A shadow's top-1 that arrived after the primary's; False when the id has already been forgotten."""
        with self._lock:
            answer = self._answers.get(request_id)
            if answer is None:
                return False
            self._add_shadow(answer, shadow, int(predicted_class))
            return True

    def _add_shadow(self, answer: _Answer, shadow: str, predicted: int) -> None:
        if shadow in answer.shadows:
            return  # counted once per request
        answer.shadows[shadow] = predicted
        self._mirrored[shadow] = self._mirrored.get(shadow, 0) + 1
        if predicted == answer.predicted:
            self._agreed[shadow] = self._agreed.get(shadow, 0) + 1
        if answer.label is not None:
            self._score(shadow, predicted == answer.label)

    def _score(self, variant: str, correct: bool) -> None:
        tally = self._accuracy.setdefault(variant, _Tally())
        tally.labelled += 1
        tally.correct += int(correct)

    def feedback(self, request_id: str, label: int) -> FeedbackResult:
        """Ground truth for an earlier request; one label per request."""
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise InvalidArgument(f"label must be an integer class index, got {label!r}")
        label = int(label)
        with self._lock:
            answer = self._answers.get(request_id)
            if answer is None:
                raise NotFound(
                    f"no recent request with id '{request_id[:200]}' (ids are kept for the last {self.capacity} requests)"
                )
            if answer.label is not None:
                raise InvalidArgument(
                    f"request '{request_id[:200]}' already has a label ({answer.label}); each request takes one label"
                )
            answer.label = label
            correct = answer.predicted == label
            self._score(answer.variant, correct)
            for shadow, predicted in answer.shadows.items():
                self._score(shadow, predicted == label)
            return FeedbackResult(answer.variant, correct)

    def online_counts(self, variant: str) -> tuple[int, int]:
        """(correct, labelled) of a variant."""
        with self._lock:
            tally = self._accuracy.get(variant)
            return (tally.correct, tally.labelled) if tally else (0, 0)

    def online_accuracy(self, variant: str) -> float | None:
        correct, labelled = self.online_counts(variant)
        return correct / labelled if labelled else None

    def agreement_counts(self, shadow: str) -> tuple[int, int]:
        """(agreed, mirrored) of a shadow."""
        with self._lock:
            return self._agreed.get(shadow, 0), self._mirrored.get(shadow, 0)

    def shadow_agreement(self, shadow: str) -> float | None:
        agreed, mirrored = self.agreement_counts(shadow)
        return agreed / mirrored if mirrored else None

    def forget_variant(self, variant: str) -> None:
        """Drops a deleted variant's tallies, so that a new variant of the same name starts from zero."""
        with self._lock:
            self._accuracy.pop(variant, None)
            self._mirrored.pop(variant, None)
            self._agreed.pop(variant, None)

    def __len__(self) -> int:
        return len(self._answers)


# ---------------------------------------------------------------------- tests


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


# ---------------------------------------------------------------------- compare


def cost_per_1000(device_seconds: float, price_per_hour: float, requests: int) -> float | None:
    """Dollars per 1000 requests: device seconds x price per hour / 3600 / requests x 1000; None without requests."""
    if requests <= 0:
        return None
    return device_seconds * price_per_hour / 3600.0 / requests * 1000.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def compare_rows(
    variants: Sequence[str],
    *,
    weights: Mapping[str, float],
    shadows: Collection[str] = (),
    latencies: Mapping[str, LatencyWindow],
    requests: Mapping[str, int],
    errors: Mapping[str, int],
    device_seconds: Mapping[str, float],
    price_per_hour: float,
    offline_accuracy: Mapping[str, float | None],
    feedback: FeedbackStore | None = None,
    baseline: str = BASELINE,
    min_samples: int = MIN_SAMPLES,
    alpha: float = ALPHA,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """One JSON-plain dict per variant (baseline first, then in the given order) for `slimctl compare`.

    Keys: variant, weight, shadow, requests, errors, latency_p50_ms, latency_p90_ms, latency_p99_ms,
    mean_batch, cost_per_1000, offline_accuracy, online_accuracy, online_accuracy_ci ([low, high] or
    None), feedback (labels received), shadow_agreement (shadows only), latency_verdict and
    accuracy_verdict (against `baseline`; None on the baseline's row). A variant missing from a
    mapping counts as no data (0 requests, empty window, unknown accuracy).
    """
    order = sorted(dict.fromkeys(variants), key=lambda v: v != baseline)
    empty = LatencyWindow(1)
    base_window = latencies.get(baseline, empty)
    base_latencies = base_window.latencies()
    base_counts = feedback.online_counts(baseline) if feedback is not None else (0, 0)
    shadow_set = set(shadows)
    rows = []
    for name in order:
        window = latencies.get(name, empty)
        pct = window.percentiles((50, 90, 99))
        n_requests = int(requests.get(name, 0))
        correct, labelled = feedback.online_counts(name) if feedback is not None else (0, 0)
        is_shadow = name in shadow_set
        row: dict[str, Any] = {
            "variant": name,
            "weight": float(weights.get(name, 0.0)),
            "shadow": is_shadow,
            "requests": n_requests,
            "errors": int(errors.get(name, 0)),
            "latency_p50_ms": _ms(pct[50]),
            "latency_p90_ms": _ms(pct[90]),
            "latency_p99_ms": _ms(pct[99]),
            "mean_batch": window.mean_batch,
            "cost_per_1000": cost_per_1000(float(device_seconds.get(name, 0.0)), price_per_hour, n_requests),
            "offline_accuracy": offline_accuracy.get(name),
            "online_accuracy": correct / labelled if labelled else None,
            "online_accuracy_ci": list(wilson_interval(correct, labelled, confidence)) if labelled else None,
            "feedback": labelled,
            "shadow_agreement": feedback.shadow_agreement(name) if (feedback is not None and is_shadow) else None,
            "latency_verdict": None,
            "accuracy_verdict": None,
        }
        if name != baseline:
            opts = {"min_n": min_samples, "alpha": alpha}
            row["latency_verdict"] = latency_verdict(base_latencies, window.latencies(), **opts)
            row["accuracy_verdict"] = accuracy_verdict(base_counts[0], base_counts[1], correct, labelled, **opts)
        rows.append(row)
    return rows
