"""What is measured of one served variant: its Prometheus series and its live statistics, fed by the same calls.

The hot path calls `begin` and `record` once per request and the batcher `record_batch` once per
model call. Each takes the variant's one lock once and adds to plain numbers (the statistics, and
the request counts and histograms that server/telemetry/metrics.py's collector exports at scrape time): the
lock because batcher threads may record while the loop thread does, plain numbers because one
prometheus_client update costs a lock and Python checks of its own (`python -m bench.bench_hotpath`).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from slimserve.server.store.manifest import VariantInfo
from slimserve.server.telemetry.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics
from slimserve.server.telemetry.statistics import VariantStats


class Buckets:
    """A histogram as prometheus_client's Histogram counts it: per bucket and a sum. An observation goes to
    `counts[bisect_left(bounds, value)]`: the first bound with value <= bound, as `le` means, or +Inf (last)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def copy(self) -> tuple[list[int], float]:
        return list(self.counts), self.sum


class VariantRecorder:
    """Metrics and statistics of one variant of one model, kept across a refresh and dropped with the variant."""

    __slots__ = (
        "_batch",
        "_codes",
        "_compute",
        "_cost",
        "_inflight",
        "_latency",
        "_lock",
        "_metrics",
        "_queue",
        "created",
        "model",
        "series",
        "stats",
        "variant",
    )

    def __init__(self, metrics: Metrics, model: str, variant: str) -> None:
        self.model = model
        self.variant = variant
        self.stats = VariantStats()
        self.created = time.time()
        # Every write below holds this lock, and `counts` copies under it: one uncontended acquire per call.
        self._lock = threading.Lock()
        self._inflight = 0
        self._codes: dict[str, list[float]] = {"OK": [0, self.created]}  # code -> [requests, when first counted]
        self._latency = Buckets(LATENCY_BUCKETS)
        self._compute = Buckets(LATENCY_BUCKETS)
        self._queue = Buckets(LATENCY_BUCKETS)
        self._batch = Buckets(BATCH_BUCKETS)
        self._cost = 0.0  # summed per call, as the counter was incremented (price x total seconds rounds differently)
        self._metrics = metrics
        self.series = metrics.series(model, variant, self)

    # ------------------------------------------------------------------ per request and per batch

    @property
    def inflight(self) -> int:
        """Requests routed here and not yet answered."""
        return self._inflight

    def begin(self) -> None:
        """A request routed here starts."""
        with self._lock:
            self._inflight += 1

    def record(self, code: str, seconds: float) -> None:
        """A request's outcome: `code` is OK or an error kind's name; `seconds` from arrival to answer."""
        with self._lock:
            self._inflight -= 1
            latency = self._latency  # observations written out here and below: a method call costs more than its body
            latency.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            latency.sum += seconds
            row = self._codes.get(code)
            if row is None:
                row = self._codes[code] = [0, time.time()]
            row[0] += 1
            if code == "OK":
                self.stats.answered(seconds)
            else:
                self.stats.failed(seconds)

    def record_batch(self, size: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """One executed model call (the batcher's on_batch): its size, each request's wait, its device time and cost."""
        with self._lock:
            self.stats.computed(size, compute_seconds, queue_seconds)
            batch, queue, compute = self._batch, self._queue, self._compute
            batch.counts[bisect_left(BATCH_BUCKETS, size)] += 1
            batch.sum += size
            for seconds in queue_seconds:
                queue.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
                queue.sum += seconds
            compute.counts[bisect_left(LATENCY_BUCKETS, compute_seconds)] += 1
            compute.sum += compute_seconds
            self._cost += compute_seconds * self._metrics.price_per_second

    def counts(self) -> dict[str, Any]:
        """The collected families' values (server/telemetry/metrics.py `Recorded`), copied together under the lock."""
        with self._lock:
            stats = self.stats
            return {
                "requests": {code: (n, since) for code, (n, since) in self._codes.items()},
                "request_duration": self._latency.copy(),
                "compute_duration": self._compute.copy(),
                "queue_duration": self._queue.copy(),
                "batch_size": self._batch.copy(),
                "cost": self._cost,
                "samples": stats.samples,
                "inflight": self._inflight,
            }

    # ------------------------------------------------------------------ shadows and feedback

    def record_shadow(self, seconds: float | None) -> None:
        """A mirrored request this variant answered in `seconds`, or failed (None); comparable with its primary's."""
        with self._lock:
            if seconds is None:
                self.stats.failed()
            else:
                self.stats.answered(seconds)

    def record_agreement(self, agreed: bool) -> None:
        """A mirrored answer compared with the primary's top-1."""
        self.series.shadow_requests.inc()
        if agreed:
            self.series.shadow_agreements.inc()

    def record_feedback(self, correct: bool) -> None:
        """A label for a request this variant answered."""
        metrics = self._metrics
        metrics.feedback.labels(self.model, self.variant, metrics.node_type, str(correct).lower()).inc()

    def record_drop(self, reason: str) -> None:
        """A request dropped from the batcher's queue before compute (the batcher's on_drop): 'deadline', 'cancelled',
        'refused', 'send' (its answer would have left after the deadline) or 'full' (the queue was full); or computed but
        ready after its deadline: 'late'. Every reason but 'cancelled' counts as shed (the SLO loop's signal)."""
        metrics = self._metrics
        metrics.queue_dropped.labels(self.model, self.variant, metrics.node_type, reason).inc()
        if reason != "cancelled":  # the caller's choice is no sign of load
            with self._lock:
                self.stats.shed += 1

    def record_online_accuracy(self, accuracy: float) -> None:
        metrics = self._metrics
        metrics.online_accuracy.labels(self.model, self.variant, metrics.node_type).set(accuracy)

    # ------------------------------------------------------------------ load and release

    def watch_queue(self, queued: Callable[[], int], capacity: int) -> None:
        """The batcher's queue, read at scrape time, and its bound."""
        self.series.queued.set_function(queued)
        self.series.queue_capacity.set(capacity)

    def describe(self, variant: VariantInfo, weight: float) -> None:
        """The gauges of a loaded variant: loaded, size, traffic weight, and what its evaluation measured."""
        series = self.series
        series.loaded.set(1)
        series.model_size.set(variant.size_bytes)
        series.traffic_weight.set(weight)
        metrics = self._metrics
        values = (self.model, self.variant, metrics.node_type)
        if variant.evaluation.get("accuracy") is not None:
            metrics.offline_accuracy.labels(*values).set(variant.evaluation["accuracy"])
        if variant.evaluation.get("flops") is not None:
            metrics.flops.labels(*values).set(variant.evaluation["flops"])

    def forget(self) -> None:
        """The variant is gone: its series stop being exported (its statistics go with this object)."""
        self._metrics.forget(self.model, self.variant)


class ServingLoad:
    """What the dataplane counts for the throttle: requests answered and their summed seconds (Little's law gives the
    mean number in flight over a window: summed seconds / window)."""

    __slots__ = ("answered", "seconds")

    def __init__(self) -> None:
        self.answered = 0
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.answered += 1
        self.seconds += seconds
