"""What is measured of one served variant: its Prometheus series and its live statistics, fed by the same calls.

The hot path calls `begin` and `record` once per request and the batcher `record_batch` once per
model call; each touches only children cached at load (no per-request label lookups).
"""

from __future__ import annotations

from collections.abc import Callable

from server.manifest import VariantInfo
from server.metrics import Metrics
from server.stats import VariantStats


class VariantRecorder:
    """Metrics and statistics of one variant of one model, kept across a refresh and dropped with the variant."""

    __slots__ = ("_metrics", "model", "series", "stats", "variant")

    def __init__(self, metrics: Metrics, model: str, variant: str) -> None:
        self.model = model
        self.variant = variant
        self.stats = VariantStats()
        self.series = metrics.series(model, variant)
        self._metrics = metrics

    # ------------------------------------------------------------------ per request and per batch

    def begin(self) -> None:
        """A request routed here starts."""
        self.series.inflight.inc()

    def record(self, code: str, seconds: float) -> None:
        """A request's outcome: `code` is OK or an error kind's name; `seconds` from arrival to answer."""
        series = self.series
        series.inflight.dec()
        series.request_duration.observe(seconds)
        if code == "OK":
            series.requests_ok.inc()
            self.stats.answered(seconds)
        else:
            metrics = self._metrics
            metrics.requests.labels(self.model, self.variant, metrics.node_type, code).inc()
            self.stats.failed(seconds)

    def record_batch(self, size: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """One executed model call (the batcher's on_batch): its size, each request's wait, its device time and cost."""
        self.stats.computed(size, compute_seconds, queue_seconds)
        series = self.series
        series.batch_size.observe(size)
        queue = series.queue_duration
        for seconds in queue_seconds:
            queue.observe(seconds)
        series.compute_duration.observe(compute_seconds)
        series.samples.inc(size)
        series.cost.inc(compute_seconds * self._metrics.price_per_second)

    # ------------------------------------------------------------------ shadows and feedback

    def record_shadow(self, seconds: float | None) -> None:
        """A mirrored request this variant answered in `seconds`, or failed (None); comparable with its primary's."""
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
