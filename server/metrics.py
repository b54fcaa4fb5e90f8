"""Prometheus metrics of the server, created against a registry that tests can replace."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latencies from 0.1 ms to 10 s: small CNNs answer in well under a millisecond.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """All slimserve_* series. Labels are bounded: model, variant, node_type, code."""

    def __init__(self, registry: CollectorRegistry | None = None, node_type: str = "cpu") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.node_type = node_type
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
        self.inflight = Gauge("slimserve_inflight_requests", "Inference requests being processed.", labels, registry=self.registry)
        self.model_size = Gauge("slimserve_model_size_bytes", "Bytes on disk of each loaded variant.", labels, registry=self.registry)
        self.loaded = Gauge("slimserve_variant_loaded", "1 while a variant is loaded and serving.", labels, registry=self.registry)

    def labels(self, model: str, variant: str) -> dict[str, str]:
        return {"model": model, "variant": variant, "node_type": self.node_type}

    def forget(self, model: str, variant: str) -> None:
        """Drops a deleted variant's series so that they stop being exported."""
        values = (model, variant, self.node_type)
        for metric in (self.request_duration, self.compute_duration, self.inflight, self.model_size, self.loaded):
            try:
                metric.remove(*values)
            except KeyError:
                pass
