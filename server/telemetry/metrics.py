"""Prometheus metrics of the server, created against a Prometheus CollectorRegistry that tests can replace.

Every per-variant metric is one `Family` row of `PER_VARIANT`: `Metrics` creates the family from it,
`VariantSeries` caches the children set at load, and `Metrics.forget` removes all of a deleted
variant's children, so no metric can be added to one place and missed in another. The families a
request updates are `collected`: server/telemetry/recording.py counts them in plain numbers under one lock
per call (prometheus_client takes a lock and runs Python checks per child update: ~10 µs a request)
and `RecordedCollector` turns those numbers into the same samples at scrape time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from slimserve.server.errors import ErrorKind

# Request latencies from 0.1 ms to 10 s: small CNNs answer in well under a millisecond.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Values of the `code` label: OK or a domain error kind's name (the gRPC code names).
RESULT_CODES = ("OK", *(kind.name for kind in ErrorKind))
VARIANT_LABELS = ("model", "variant", "node_type")


@dataclass(frozen=True)
class Family:
    """One per-variant metric, labelled model, variant, node_type and `extra` labels (each with all its values).

    `cached` names the VariantSeries attribute holding the child made when the variant loads (for a
    family with extra labels: the child of each extra label's first value); None for a metric set on
    demand, whose child must not exist before it has a value (an accuracy gauge at 0 would read as 0%).
    `collected`: counted per request by server/telemetry/recording.py and exported by `RecordedCollector` from
    the variant's `Recorded.counts()[attr]` (no prometheus_client object; its series exist from load).
    """

    attr: str  # the Metrics attribute
    kind: type
    name: str
    help: str
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    buckets: tuple[float, ...] | None = None
    cached: str | None = None
    collected: bool = False


PER_VARIANT: tuple[Family, ...] = (
    Family(
        "requests",
        Counter,
        "slimserve_requests_total",
        "Inference requests answered, by status code.",
        extra=(("code", RESULT_CODES),),
        collected=True,
    ),
    Family(
        "request_duration",
        Histogram,
        "slimserve_request_duration_seconds",
        "Time from receiving an inference request to answering it.",
        buckets=LATENCY_BUCKETS,
        collected=True,
    ),
    Family(
        "compute_duration",
        Histogram,
        "slimserve_compute_duration_seconds",
        "Time the runtime spent computing one call (a batch).",
        buckets=LATENCY_BUCKETS,
        collected=True,
    ),
    Family(
        "queue_duration",
        Histogram,
        "slimserve_queue_duration_seconds",
        "Time a request waited in the batcher's queue before its batch started.",
        buckets=LATENCY_BUCKETS,
        collected=True,
    ),
    Family("batch_size", Histogram, "slimserve_batch_size", "Samples per executed model call.", buckets=BATCH_BUCKETS, collected=True),
    Family(
        "cost",
        Counter,
        "slimserve_inference_cost_dollars_total",
        "Dollars of device time spent computing: compute seconds times the node type's price per hour / 3600.",
        collected=True,
    ),
    Family("samples", Counter, "slimserve_inferences_total", "Samples inferred (requests can carry several).", collected=True),
    Family("offline_accuracy", Gauge, "slimserve_offline_accuracy_ratio", "Top-1 accuracy of a variant on the model's evaluation data."),
    Family("flops", Gauge, "slimserve_model_flops", "FLOPs per sample of a variant."),
    Family("online_accuracy", Gauge, "slimserve_online_accuracy_ratio", "Top-1 accuracy on live traffic that received feedback."),
    Family(
        "feedback",
        Counter,
        "slimserve_feedback_total",
        "Ground-truth labels received, by whether the answer was right.",
        extra=(("correct", ("true", "false")),),
    ),
    Family(
        "shadow_requests", Counter, "slimserve_shadow_requests_total", "Requests mirrored to a shadow variant.", cached="shadow_requests"
    ),
    Family(
        "shadow_agreements",
        Counter,
        "slimserve_shadow_agreements_total",
        "Mirrored requests whose top-1 answer equalled the primary's.",
        cached="shadow_agreements",
    ),
    Family(
        "traffic_weight",
        Gauge,
        "slimserve_traffic_weight_ratio",
        "Share of a model's traffic routed to a variant (0..1).",
        cached="traffic_weight",
    ),
    Family(
        "queued", Gauge, "slimserve_queue_requests", "Requests waiting in a variant's batcher queue (read at scrape time).", cached="queued"
    ),
    Family(
        "queue_capacity",
        Gauge,
        "slimserve_queue_capacity_requests",
        "Most requests a variant's queue holds before RESOURCE_EXHAUSTED.",
        cached="queue_capacity",
    ),
    Family(
        "queue_dropped",
        Counter,
        "slimserve_queue_dropped_total",
        "Requests dropped from a batcher's queue before compute: their deadline passed or their call would end after it "
        "(answered DEADLINE_EXCEEDED), their caller cancelled, or the queue ahead could not let them make their deadline "
        "(refused on arrival, RESOURCE_EXHAUSTED); 'send': their compute would end in time, but the variant's measured time "
        "after compute (handing back, encoding, sending) would take the answer past the deadline (refused or dropped "
        "before compute); 'full': the queue was full (RESOURCE_EXHAUSTED); 'late': computed, but the answer was ready "
        "after the deadline (answered DEADLINE_EXCEEDED, not sent late).",
        extra=(("reason", ("deadline", "cancelled", "refused", "late", "send", "full")),),
        cached="queue_dropped",  # exported at 0 from load: a rate over it reads 0, not "no data"
    ),
    Family("inflight", Gauge, "slimserve_inflight_requests", "Inference requests being processed.", collected=True),
    Family("model_size", Gauge, "slimserve_model_size_bytes", "Bytes on disk of each loaded variant.", cached="model_size"),
    Family("loaded", Gauge, "slimserve_variant_loaded", "1 while a variant is loaded and serving.", cached="loaded"),
)


# ---- rollouts (server/rollout/metrics.py sets them; the writer's controller alone has values). Labelled by the variant
# rolled out; set on demand (cached=None): a model that never had a rollout exports none of them.
ROLLOUT_STATES = ("shadow", "canary", "promoted", "rolled_back", "aborted")
ROLLOUT_GATES = ("error", "latency_p50", "latency_p99", "accuracy", "agreement", "cost", "time_limit")  # plan.py's gates + the stage limit
ROLLOUT_FAMILIES: tuple[Family, ...] = (
    Family(
        "rollout_state",
        Gauge,
        "slimserve_rollout_state",
        "1 for the state of the model's latest rollout of this variant, 0 for the other states.",
        extra=(("state", ROLLOUT_STATES),),
    ),
    Family(
        "rollout_canary_weight",
        Gauge,
        "slimserve_rollout_canary_weight_ratio",
        "Live traffic share the rollout gives its variant (0 in shadow and after a rollback, 1 once promoted).",
    ),
    Family(
        "rollout_decisions",
        Counter,
        "slimserve_rollout_decisions_total",
        "Gate decisions a rollout acted on at the end of a stage, by gate and outcome (time_limit: an undecided stage ran out).",
        extra=(("gate", ROLLOUT_GATES), ("decision", ("pass", "fail"))),
    ),
)
PER_VARIANT += ROLLOUT_FAMILIES
# ---- latency objectives (server/rollout/slo_controller.py): labelled by the fastest eligible variant, the one traffic moves to.
SLO_REASONS = ("toward_fast", "back", "pause_shadows", "resume_shadows", "saturated")
SLO_FAMILIES: tuple[Family, ...] = (
    Family(
        "slo_shifts",
        Counter,
        "slimserve_slo_shifts_total",
        "Changes the SLO steering made to a model's split, by reason (toward_fast: the p99 broke the objective; back: "
        "it stayed under 0.6x; saturated: all traffic on the fastest variant and still breaking).",
        extra=(("reason", SLO_REASONS),),
        cached="slo_shifts",  # exported at 0 from load, like queue_dropped
    ),
)
PER_VARIANT += SLO_FAMILIES


class Recorded(Protocol):
    """What a variant's recorder gives the collector: {collected family attr: its value}, copied under its lock.

    A Counter's value is a number, or {extra label value: number} for one with an extra label (only
    the values counted so far are exported); a Gauge's a number; a Histogram's (per-bucket counts,
    one per bound and one for +Inf, not cumulative; sum). `created` is when the variant's series began.
    """

    created: float

    def counts(self) -> Mapping[str, Any]: ...


class VariantSeries:
    """The children of one variant that PER_VARIANT marks `cached`, looked up once at load (`.labels()` costs microseconds).

    Attributes are the families' `cached` names (slots: attribute reads stay as fast as a dataclass's).
    """

    __slots__ = tuple(f.cached for f in PER_VARIANT if f.cached is not None)

    def __init__(self, children: dict[str, Any]) -> None:
        for name, child in children.items():
            setattr(self, name, child)

    def __getattr__(self, name: str) -> Any:  # only reached for a name that is not a slot: say which
        raise AttributeError(f"VariantSeries has no cached child '{name}' (cached: {', '.join(self.__slots__)})")


class RecordedCollector:
    """Exports the `collected` families from every registered variant's counts, as prometheus_client's own
    Counter / Gauge / Histogram children would (same names, labels, buckets, `_created` series)."""

    def __init__(self, node_type: str) -> None:
        self.node_type = node_type
        self.sources: dict[tuple[str, str], Recorded] = {}  # replaced whole on change: collect() reads a stable dict

    def add(self, model: str, variant: str, source: Recorded) -> None:
        self.sources = {**self.sources, (model, variant): source}

    def remove(self, model: str, variant: str) -> None:
        self.sources = {k: v for k, v in self.sources.items() if k != (model, variant)}

    def describe(self) -> list[Metric]:
        return [_metric(f) for f in PER_VARIANT if f.collected]

    def collect(self) -> Iterator[Metric]:
        rows = [((model, variant, self.node_type), source.created, source.counts()) for (model, variant), source in self.sources.items()]
        for family in PER_VARIANT:
            if not family.collected:
                continue
            metric = _metric(family)
            labelnames = (*VARIANT_LABELS, *(name for name, _ in family.extra))
            for values, created, counts in rows:
                value = counts[family.attr]
                if isinstance(value, dict):  # one extra label: a child per value counted so far
                    for extra, (number, since) in value.items():
                        _add_child(metric, family, dict(zip(labelnames, (*values, extra))), number, since)
                else:
                    _add_child(metric, family, dict(zip(labelnames, values)), value, created)
            yield metric


def _metric(family: Family) -> Metric:
    """The empty family as prometheus_client's metric of `family.kind` exports it (a counter's name without _total)."""
    kind = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}[family.kind]
    return Metric(family.name.removesuffix("_total") if family.kind is Counter else family.name, family.help, kind)


def _add_child(metric: Metric, family: Family, labels: dict[str, str], value: Any, created: float) -> None:
    """The samples of one child, in prometheus_client's order (Counter._child_samples, Histogram._child_samples)."""
    use_created = prometheus_metrics._use_created  # PROMETHEUS_DISABLE_CREATED_SERIES, read as prometheus_client reads it
    if family.kind is Gauge:
        metric.add_sample(metric.name, labels, float(value))
        return
    if family.kind is Counter:
        metric.add_sample(metric.name + "_total", labels, float(value))
        if use_created:
            metric.add_sample(metric.name + "_created", labels, created)
        return
    counts, total = value
    cumulative = 0.0
    for bound, count in zip((*family.buckets, float("inf")), counts):
        cumulative += count
        metric.add_sample(metric.name + "_bucket", {**labels, "le": floatToGoString(bound)}, cumulative)
    metric.add_sample(metric.name + "_count", labels, cumulative)
    metric.add_sample(metric.name + "_sum", labels, total)
    if use_created:
        metric.add_sample(metric.name + "_created", labels, created)


class Metrics:
    """All slimserve_* series. Labels are bounded: model, variant, node_type, code, correct."""

    # The families made as prometheus_client objects, as attributes (declared for readers and type checkers;
    # created from PER_VARIANT). The `collected` ones have no object: `collector` exports them.
    offline_accuracy: Gauge
    flops: Gauge
    online_accuracy: Gauge
    feedback: Counter
    shadow_requests: Counter
    shadow_agreements: Counter
    traffic_weight: Gauge
    queued: Gauge
    queue_capacity: Gauge
    queue_dropped: Counter
    model_size: Gauge
    loaded: Gauge
    rollout_state: Gauge  # the rollout block above
    rollout_canary_weight: Gauge
    rollout_decisions: Counter
    slo_shifts: Counter

    def __init__(self, registry: CollectorRegistry | None = None, node_type: str = "cpu", price_per_hour: float = 0.0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.node_type = node_type
        self.price_per_second = price_per_hour / 3600.0
        for family in PER_VARIANT:
            if family.collected:
                continue
            labels = (*VARIANT_LABELS, *(name for name, _ in family.extra))
            options: dict[str, Any] = {"buckets": family.buckets} if family.buckets is not None else {}
            setattr(self, family.attr, family.kind(family.name, family.help, labels, registry=self.registry, **options))
        self.collector = RecordedCollector(node_type)
        self.registry.register(self.collector)
        self.price = Gauge(
            "slimserve_node_price_dollars_per_hour", "Price of this node type, as configured.", ("node_type",), registry=self.registry
        )
        self.price.labels(node_type=node_type).set(price_per_hour)
        # Optimizer jobs under the job yield (server/management/throttle.py, set by management/jobs.py). Labelled by the
        # job's model and recipe (not its id: one series per job would grow without bound).
        self.job_paused = Counter(
            "slimserve_job_paused_seconds",
            "Time the job yield (--job-yield) held optimizer job workers stopped while serving was busy, by model and recipe.",
            ("model", "recipe", "node_type"),
            registry=self.registry,
        )
        self.job_run_fraction = Gauge(
            "slimserve_job_yield_run_ratio",
            "Fraction of the time a local optimizer job's worker runs now under the job yield (1: serving is not busy, or no job).",
            ("node_type",),
            registry=self.registry,
        )

    def labels(self, model: str, variant: str) -> dict[str, str]:
        return {"model": model, "variant": variant, "node_type": self.node_type}

    def series(self, model: str, variant: str, recorded: Recorded | None = None) -> VariantSeries:
        """The variant's cached children; `recorded` (its recorder) is exported for the collected families from now on."""
        if recorded is not None:
            self.collector.add(model, variant, recorded)
        values = (model, variant, self.node_type)
        return VariantSeries(
            {
                f.cached: getattr(self, f.attr).labels(*values, *(options[0] for _, options in f.extra))
                for f in PER_VARIANT
                if f.cached is not None
            }
        )

    def forget(self, model: str, variant: str) -> None:
        """Drops every child of a deleted variant, of every family and every value of its extra labels."""
        self.collector.remove(model, variant)
        values = (model, variant, self.node_type)
        for family in PER_VARIANT:
            if family.collected:
                continue
            metric = getattr(self, family.attr)
            for extra in itertools.product(*(options for _, options in family.extra)):
                try:
                    metric.remove(*values, *extra)
                except KeyError:
                    pass
