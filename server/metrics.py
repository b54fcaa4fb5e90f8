"""Prometheus metrics of the server, created against a registry that tests can replace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.errors import ErrorKind

# Request latencies from 0.1 ms to 10 s: small CNNs answer in well under a millisecond.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Values of the `code` label: OK or a domain error kind's name (the gRPC code names).
RESULT_CODES = ("OK", *(kind.name for kind in ErrorKind))


@dataclass(frozen=True)
class VariantSeries:
    """The labelled children of one variant, looked up once: `.labels()` on every request costs microseconds."""

    requests_ok: Any
    request_duration: Any
    inflight: Any
    batch_size: Any
    queue_duration: Any
    compute_duration: Any
    samples: Any
    cost: Any
    shadow_requests: Any
    shadow_agreements: Any


class Metrics:
    """All slimserve_* series. Labels are bounded: model, variant, node_type, code."""

    def __init__(self, registry: CollectorRegistry | None = None, node_type: str = "cpu", price_per_hour: float = 0.0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.node_type = node_type
        self.price_per_second = price_per_hour / 3600.0
        labels = ("model", "variant", "node_type")
        self.requests = Counter(
            "slimserve_requests_total", "Inference requests answered, by status code.", (*labels, "code"), registry=self.registry
        )
        self.request_duration = Histogram(
            "slimserve_request_duration_seconds",
            "Time from receiving an inference request to answering it.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_duration = Histogram(
            "slimserve_compute_duration_seconds",
            "Time the runtime spent computing one call (a batch).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "slimserve_queue_duration_seconds",
            "Time a request waited in the batcher's queue before its batch started.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size", "Samples per executed model call.", labels, buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.cost = Counter(
            "slimserve_inference_cost_dollars_total",
            "Dollars of device time spent computing: compute seconds times the node type's price per hour / 3600.",
            labels,
            registry=self.registry,
        )
        self.samples = Counter("slimserve_inferences_total", "Samples inferred (requests can carry several).", labels, registry=self.registry)
        self.price = Gauge(
            "slimserve_node_price_dollars_per_hour", "Price of this node type, as configured.", ("node_type",), registry=self.registry
        )
        self.price.labels(node_type=node_type).set(price_per_hour)
        self.offline_accuracy = Gauge(
            "slimserve_offline_accuracy_ratio", "Top-1 accuracy of a variant on the model's evaluation data.", labels, registry=self.registry
        )
        self.flops = Gauge("slimserve_model_flops", "FLOPs per sample of a variant.", labels, registry=self.registry)
        self.online_accuracy = Gauge(
            "slimserve_online_accuracy_ratio", "Top-1 accuracy on live traffic that received feedback.", labels, registry=self.registry
        )
        self.feedback = Counter(
            "slimserve_feedback_total", "Ground-truth labels received, by whether the answer was right.", (*labels, "correct"),
            registry=self.registry,
        )
        self.shadow_requests = Counter(
            "slimserve_shadow_requests_total", "Requests mirrored to a shadow variant.", labels, registry=self.registry
        )
        self.shadow_agreements = Counter(
            "slimserve_shadow_agreements_total", "Mirrored requests whose top-1 answer equalled the primary's.", labels,
            registry=self.registry,
        )
        self.traffic_weight = Gauge(
            "slimserve_traffic_weight_ratio", "Share of a model's traffic routed to a variant (0..1).", labels, registry=self.registry
        )
        self.queued = Gauge(
            "slimserve_queue_requests", "Requests waiting in a variant's batcher queue (read at scrape time).", labels,
            registry=self.registry,
        )
        self.queue_capacity = Gauge(
            "slimserve_queue_capacity_requests", "Most requests a variant's queue holds before RESOURCE_EXHAUSTED.", labels,
            registry=self.registry,
        )
        self.inflight = Gauge("slimserve_inflight_requests", "Inference requests being processed.", labels, registry=self.registry)
        self.model_size = Gauge("slimserve_model_size_bytes", "Bytes on disk of each loaded variant.", labels, registry=self.registry)
        self.loaded = Gauge("slimserve_variant_loaded", "1 while a variant is loaded and serving.", labels, registry=self.registry)

    def labels(self, model: str, variant: str) -> dict[str, str]:
        return {"model": model, "variant": variant, "node_type": self.node_type}

    def series(self, model: str, variant: str) -> VariantSeries:
        labels = self.labels(model, variant)
        return VariantSeries(
            requests_ok=self.requests.labels(**labels, code="OK"),
            request_duration=self.request_duration.labels(**labels),
            inflight=self.inflight.labels(**labels),
            batch_size=self.batch_size.labels(**labels),
            queue_duration=self.queue_duration.labels(**labels),
            compute_duration=self.compute_duration.labels(**labels),
            samples=self.samples.labels(**labels),
            cost=self.cost.labels(**labels),
            shadow_requests=self.shadow_requests.labels(**labels),
            shadow_agreements=self.shadow_agreements.labels(**labels),
        )

    def observe_batch(self, series: VariantSeries, batch_size: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """One executed model call: its size, each request's wait, its device time and cost."""
        series.batch_size.observe(batch_size)
        queue = series.queue_duration
        for seconds in queue_seconds:
            queue.observe(seconds)
        series.compute_duration.observe(compute_seconds)
        series.samples.inc(batch_size)
        series.cost.inc(compute_seconds * self.price_per_second)

    def forget(self, model: str, variant: str) -> None:
        """Drops a deleted variant's series so that they stop being exported."""
        values = (model, variant, self.node_type)
        per_variant = (
            self.request_duration, self.compute_duration, self.queue_duration, self.batch_size, self.cost, self.samples,
            self.offline_accuracy, self.flops, self.online_accuracy, self.shadow_requests, self.shadow_agreements,
            self.traffic_weight, self.inflight, self.model_size, self.loaded, self.queued, self.queue_capacity,
        )
        for metric in per_variant:
            try:
                metric.remove(*values)
            except KeyError:
                pass
        for code in RESULT_CODES:
            try:
                self.requests.remove(*values, code)
            except KeyError:
                pass
