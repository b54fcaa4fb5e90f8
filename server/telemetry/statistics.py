"""Live statistics of variants: latency windows and counters, online accuracy from feedback, and compare rows.

Pure domain code: no gRPC, no Prometheus (server/telemetry/recording.py feeds both from one call).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimserve.server.errors import InvalidArgument, NotFound
from slimserve.server.telemetry.significance import ALPHA, MIN_SAMPLES, accuracy_verdict, latency_verdict, wilson_interval

BASELINE = "baseline"
DEFAULT_WINDOW = 10_000
DEFAULT_FEEDBACK_IDS = 100_000


# ---------------------------------------------------------------------- latency


class LatencyWindow:
    """The last `capacity` request latencies (seconds) of one variant; thread-safe, O(1) record."""

    def __init__(self, capacity: int = DEFAULT_WINDOW) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._latency = [0.0] * capacity
        self._next = 0  # next slot to write
        self._total = 0  # requests recorded since creation
        self._lock = threading.Lock()

    def record(self, latency_s: float) -> None:
        """One answered request's latency."""
        with self._lock:
            i = self._next
            self._latency[i] = latency_s
            self._next = 0 if i + 1 == self.capacity else i + 1
            self._total += 1

    def latencies(self) -> np.ndarray:
        """A copy of the window's latencies in seconds (order not meaningful)."""
        with self._lock:
            n = min(self._total, self.capacity)
            return np.array(self._latency[:n], dtype=np.float64)

    @property
    def total(self) -> int:
        """Latencies recorded since creation (a mark for `since`)."""
        with self._lock:
            return self._total

    def since(self, mark: int) -> np.ndarray:
        """The latencies recorded after `total` was `mark`, oldest first; only the last `capacity` of them are kept."""
        with self._lock:
            k = min(max(self._total - mark, 0), self.capacity, self._total)
            order = [(self._next - k + i) % self.capacity for i in range(k)]
            return np.array([self._latency[i] for i in order], dtype=np.float64)

    def percentiles(self, ps: Iterable[float] = (50, 90, 99)) -> dict[float, float | None]:
        """{p: latency in seconds} over the window; None for each p while the window is empty."""
        ps = list(ps)
        samples = self.latencies()
        if samples.size == 0:
            return dict.fromkeys(ps)
        values = np.percentile(samples, ps)
        return {p: float(v) for p, v in zip(ps, values)}


@dataclass
class VariantStats:
    """The server's own measurements of one served variant since it was loaded: what `slimctl compare` reads,
    and Triton's ModelStatistics counters (plain ints, nanoseconds). Not locked: server/telemetry/recording.py's
    VariantRecorder, through which the server writes them, holds its lock around every write."""

    window: LatencyWindow = field(default_factory=LatencyWindow)
    requests: int = 0
    errors: int = 0
    shed: int = 0  # requests the batcher refused on arrival or dropped at their deadline (the SLO reads it)
    batches: int = 0  # Triton's execution_count
    samples: int = 0  # Triton's inference_count
    device_seconds: float = 0.0
    success_ns: int = 0  # arrival to answer, summed over answered requests (count: requests - errors)
    fail_ns: int = 0
    queued: int = 0  # requests that went through the queue of an executed batch
    queue_ns: int = 0
    infer_ns: int = 0  # each request's share of model compute: its batch's duration (Triton's compute_infer)
    last_inference_ms: int = 0  # wall clock of the last answer (ms since the epoch); 0: none yet
    # Per executed batch size: [model calls, their summed duration in ns] (Triton's batch_stats).
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float | None:
        """Samples per executed model call."""
        return self.samples / self.batches if self.batches else None

    def answered(self, latency_s: float) -> None:
        self.requests += 1
        self.success_ns += int(latency_s * 1e9)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.window.record(latency_s)

    def failed(self, latency_s: float = 0.0) -> None:
        self.requests += 1
        self.errors += 1
        self.fail_ns += int(latency_s * 1e9)

    def computed(self, size: int, device_seconds: float, queue_seconds: Sequence[float] = ()) -> None:
        """One executed model call (a batch of `size` samples) and the queue wait of each request it held."""
        self.batches += 1
        self.samples += size
        self.device_seconds += device_seconds
        ns = int(device_seconds * 1e9)
        n = len(queue_seconds)
        self.queued += n
        self.queue_ns += int(sum(queue_seconds) * 1e9)
        self.infer_ns += ns * n
        row = self.batch_sizes.get(size)
        if row is None:
            self.batch_sizes[size] = [1, ns]
        else:
            row[0] += 1
            row[1] += ns


# ---------------------------------------------------------------------- feedback


@dataclass(slots=True)
class _Answer:  # one per request: slotted, its shadows' dict made only for a mirrored one
    variant: str
    predicted: int  # a one-row request's top-1
    shadows: dict[str, int] | None = None
    label: int | None = None
    # A multi-row request's top-1 per row, as int32 bytes: one allocation (two ndarrays cost ~260 B more an answer, and
    # the store holds `capacity` of them: 100 000 8-row answers took 45 MiB, now 26 MiB: python -m bench.bench_feedback_memory).
    rows: bytes | None = None
    labelled: bytearray | None = None  # which rows have a label: made by the first label, most answers never get one


@dataclass(frozen=True)
class FeedbackResult:
    """What a label (or one label per row) said about the request's answer."""

    variant: str
    correct: bool  # every labelled row right
    rows: int = 1
    correct_rows: int = 0


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

    def record_rows(self, request_id: str, variant: str, predicted: np.ndarray) -> None:
        """The primary's top-1 of each row of a multi-row request: feedback then takes one label per row, or a row's."""
        self._remember(request_id, _Answer(variant, -1, rows=np.asarray(predicted, dtype=np.int32).tobytes()))

    def _remember(self, request_id: str, answer: _Answer) -> None:
        with self._lock:
            if request_id in self._answers:
                del self._answers[request_id]
            self._answers[request_id] = answer
            if len(self._answers) > self.capacity:
                self._answers.popitem(last=False)

    def record_prediction(self, request_id: str, variant: str, predicted_class: int, shadows: Mapping[str, int] | None = None) -> None:
        """The primary's top-1 for a request and, where already known, each shadow's."""
        answer = _Answer(variant, int(predicted_class))
        with self._lock:
            if request_id in self._answers:
                del self._answers[request_id]  # a reused id: the newest answer is the one a label refers to
            self._answers[request_id] = answer
            if len(self._answers) > self.capacity:
                self._answers.popitem(last=False)
            if shadows:
                for shadow, predicted in shadows.items():
                    self._add_shadow(answer, shadow, int(predicted))

    def record_shadow(self, request_id: str, shadow: str, predicted_class: int) -> bool:
        """A shadow's top-1 that arrived after the primary's; False when the id has already been forgotten."""
        with self._lock:
            answer = self._answers.get(request_id)
            if answer is None or answer.rows is not None:
                return False
            self._add_shadow(answer, shadow, int(predicted_class))
            return True

    def _add_shadow(self, answer: _Answer, shadow: str, predicted: int) -> None:
        if answer.shadows is None:
            answer.shadows = {}
        elif shadow in answer.shadows:
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

    def feedback(self, request_id: str, label: int | None = None, labels: Sequence[int] = (), row: int | None = None) -> FeedbackResult:
        """Ground truth for an earlier request: `label` for a one-row request (or, with `row`, for that row of a
        multi-row one), or `labels`, one per row. Each row takes one label."""
        for value in (label, *labels):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise InvalidArgument(f"label must be an integer class index, got {value!r}")
        if labels and (label is not None or row is not None):
            raise InvalidArgument("send either labels (one per row) or one label (with a row for a multi-row request), not both")
        with self._lock:
            answer = self._answers.get(request_id)
            if answer is None:
                raise NotFound(f"no recent request with id '{request_id[:200]}' (ids are kept for the last {self.capacity} requests)")
            if answer.rows is not None:
                return self._label_rows(request_id[:200], answer, label, list(labels), row)
            if labels:
                if len(labels) != 1:
                    raise InvalidArgument(f"request '{request_id[:200]}' had 1 row; it takes 1 label, not {len(labels)}")
                label = labels[0]
            if row not in (None, 0):
                raise InvalidArgument(f"request '{request_id[:200]}' had 1 row; row {row} does not exist (rows: 0)")
            if label is None:
                raise InvalidArgument("no label: send the true class of the request")
            label = int(label)
            if answer.label is not None:
                raise InvalidArgument(f"request '{request_id[:200]}' already has a label ({answer.label}); each request takes one label")
            answer.label = label
            correct = answer.predicted == label
            self._score(answer.variant, correct)
            for shadow, predicted in (answer.shadows or {}).items():
                self._score(shadow, predicted == label)
            return FeedbackResult(answer.variant, correct, 1, int(correct))

    def _label_rows(self, shown_id: str, answer: _Answer, label: int | None, labels: list[int], row: int | None) -> FeedbackResult:
        """Labels for rows of a multi-row request (under the lock): all rows at once, or one row."""
        assert answer.rows is not None
        predicted = np.frombuffer(answer.rows, dtype=np.int32)
        n = len(predicted)
        if labels:
            if len(labels) != n:
                raise InvalidArgument(f"request '{shown_id}' had {n} rows: send {n} labels, one per row in order (got {len(labels)})")
            indices = list(range(n))
        elif row is None:
            raise InvalidArgument(
                f"request '{shown_id}' had {n} rows: send one label per row (slimctl feedback MODEL ID L0 L1 ...), "
                "or a row's label with its index (--row N)"
            )
        elif not 0 <= row < n:
            raise InvalidArgument(f"request '{shown_id}' had {n} rows; row {row} does not exist (rows: 0 to {n - 1})")
        else:
            if label is None:
                raise InvalidArgument(f"no label for row {row}: send the true class of that row")
            indices, labels = [row], [label]
        if answer.labelled is None:
            answer.labelled = bytearray(n)
        again = [i for i in indices if answer.labelled[i]]
        if again:
            shown = ", ".join(str(i) for i in again[:10]) + (" ..." if len(again) > 10 else "")
            raise InvalidArgument(f"request '{shown_id}': row(s) {shown} already have a label; each row takes one label")
        right = 0
        for i, value in zip(indices, labels):
            answer.labelled[i] = 1
            correct = int(predicted[i]) == int(value)
            right += correct
            self._score(answer.variant, correct)
        return FeedbackResult(answer.variant, right == len(indices), len(indices), right)

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
        """Drops a variant's tallies and answers, so that a new variant of the same name starts from zero
        (a late label for a request it answered is then unknown, not scored for the newcomer)."""
        with self._lock:
            for request_id in [i for i, a in self._answers.items() if a.variant == variant]:
                del self._answers[request_id]
            for answer in self._answers.values():
                if answer.shadows:
                    answer.shadows.pop(variant, None)
            self._accuracy.pop(variant, None)
            self._mirrored.pop(variant, None)
            self._agreed.pop(variant, None)

    def __len__(self) -> int:
        return len(self._answers)


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
    stats: Mapping[str, VariantStats],
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
    empty = VariantStats(LatencyWindow(1))
    base_latencies = stats.get(baseline, empty).window.latencies()
    base_counts = feedback.online_counts(baseline) if feedback is not None else (0, 0)
    shadow_set = set(shadows)
    rows = []
    for name in order:
        measured = stats.get(name, empty)
        pct = measured.window.percentiles((50, 90, 99))
        correct, labelled = feedback.online_counts(name) if feedback is not None else (0, 0)
        is_shadow = name in shadow_set
        row: dict[str, Any] = {
            "variant": name,
            "weight": float(weights.get(name, 0.0)),
            "shadow": is_shadow,
            "requests": measured.requests,
            "errors": measured.errors,
            "latency_p50_ms": _ms(pct[50]),
            "latency_p90_ms": _ms(pct[90]),
            "latency_p99_ms": _ms(pct[99]),
            "mean_batch": measured.mean_batch,  # per executed model call, as the batcher ran them
            "cost_per_1000": cost_per_1000(measured.device_seconds, price_per_hour, measured.requests),
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
            row["latency_verdict"] = latency_verdict(base_latencies, measured.window.latencies(), **opts)
            row["accuracy_verdict"] = accuracy_verdict(base_counts[0], base_counts[1], correct, labelled, **opts)
        rows.append(row)
    return rows
