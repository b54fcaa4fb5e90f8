"""Metrics: the per-variant table creates the families as exported, caches the children set at load, and forgets all of a variant."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

from slimserve.server.telemetry.metrics import PER_VARIANT, RESULT_CODES, VARIANT_LABELS, Metrics
from slimserve.server.telemetry.recording import VariantRecorder

TYPES = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}


def _series_of(registry: CollectorRegistry, variant: str) -> set[str]:
    return {s.name for family in registry.collect() for s in family.samples if s.labels.get("variant") == variant}


def test_every_family_is_exported_with_its_name_help_type_labels_and_buckets():
    metrics = Metrics(node_type="gpu-v100", price_per_hour=2.48)
    recorder = VariantRecorder(metrics, "m", "v")
    values = ("m", "v", "gpu-v100")
    for family in PER_VARIANT:  # a child of every family, the on-demand ones included
        if family.collected:
            continue
        child = getattr(metrics, family.attr).labels(*values, *(options[0] for _, options in family.extra))
        getattr(child, {Counter: "inc", Gauge: "set", Histogram: "observe"}[family.kind])(1)
    recorder.record("OK", 0.001)
    exported = {m.name: m for m in metrics.registry.collect()}
    for family in PER_VARIANT:
        # prometheus_client keeps a counter's name without _total and adds it on export
        name = family.name.removesuffix("_total") if family.kind is Counter else family.name
        metric = exported[name]
        assert (metric.documentation, metric.type) == (family.help, TYPES[family.kind]), family.name
        labelnames = {*VARIANT_LABELS, *(n for n, _ in family.extra)}
        for sample in metric.samples:
            assert set(sample.labels) - {"le"} == labelnames, sample
        assert {s.labels["variant"] for s in metric.samples} == {"v"}
        if family.kind is Histogram:
            les = [s.labels["le"] for s in metric.samples if s.name.endswith("_bucket")]
            assert les == [floatToGoString(b) for b in (*family.buckets, float("inf"))]
    assert metrics.registry.get_sample_value("slimserve_node_price_dollars_per_hour", {"node_type": "gpu-v100"}) == 2.48


def test_only_children_set_at_load_exist_and_accuracy_gauges_wait_for_a_value():
    metrics = Metrics()
    recorder = VariantRecorder(metrics, "m", "v")
    labels = {"model": "m", "variant": "v", "node_type": "cpu"}
    get = metrics.registry.get_sample_value
    assert get("slimserve_requests_total", {**labels, "code": "OK"}) == 0  # exported from load, as a cached child was
    assert get("slimserve_request_duration_seconds_count", labels) == 0
    recorder.begin()
    recorder.record("OK", 0.001)
    assert get("slimserve_requests_total", {**labels, "code": "OK"}) == 1
    assert get("slimserve_requests_total", {**labels, "code": "INTERNAL"}) is None
    assert get("slimserve_online_accuracy_ratio", labels) is None  # not 0: no labels yet
    assert get("slimserve_offline_accuracy_ratio", labels) is None


def test_forget_removes_every_series_of_the_variant_and_only_those():
    metrics = Metrics()
    for variant in ("gone", "kept"):
        recorder = VariantRecorder(metrics, "m", variant)
        recorder.record_batch(2, [0.001, 0.002], 0.003)
        values = ("m", variant, "cpu")
        for code in RESULT_CODES:
            recorder.begin()
            recorder.record(code, 0.001)
        metrics.feedback.labels(*values, "true").inc()
        metrics.feedback.labels(*values, "false").inc()
        metrics.online_accuracy.labels(*values).set(0.5)
        metrics.offline_accuracy.labels(*values).set(0.9)
        metrics.flops.labels(*values).set(1e6)
    before = _series_of(metrics.registry, "kept")
    assert {"slimserve_feedback_total", "slimserve_requests_total", "slimserve_batch_size_bucket"} <= before
    metrics.forget("m", "gone")
    assert _series_of(metrics.registry, "gone") == set()
    assert _series_of(metrics.registry, "kept") == before
    metrics.forget("m", "never-loaded")  # nothing to remove is not an error
