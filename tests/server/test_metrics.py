"""Metrics: the per-variant table creates the families as exported, caches the hot children, and forgets all of a variant."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from server.metrics import PER_VARIANT, RESULT_CODES, Metrics


def _series_of(registry: CollectorRegistry, variant: str) -> set[str]:
    return {s.name for family in registry.collect() for s in family.samples if s.labels.get("variant") == variant}


def test_every_family_is_exported_with_its_name_help_and_labels():
    metrics = Metrics(node_type="gpu-v100", price_per_hour=2.48)
    for family in PER_VARIANT:
        metric = getattr(metrics, family.attr)
        # prometheus_client keeps a counter's name without _total and adds it on export
        assert metric._name == (family.name.removesuffix("_total") if family.kind is Counter else family.name)
        assert metric._documentation == family.help
        assert metric._labelnames == ("model", "variant", "node_type", *(name for name, _ in family.extra))
        if family.kind is Histogram:
            assert tuple(metric._upper_bounds[:-1]) == family.buckets
    assert metrics.registry.get_sample_value("slimserve_node_price_dollars_per_hour", {"node_type": "gpu-v100"}) == 2.48


def test_only_cached_children_exist_after_load_and_accuracy_gauges_wait_for_a_value():
    metrics = Metrics()
    series = metrics.series("m", "v")
    series.requests_ok.inc()
    labels = {"model": "m", "variant": "v", "node_type": "cpu"}
    assert metrics.registry.get_sample_value("slimserve_requests_total", {**labels, "code": "OK"}) == 1
    assert metrics.registry.get_sample_value("slimserve_requests_total", {**labels, "code": "INTERNAL"}) is None
    assert metrics.registry.get_sample_value("slimserve_online_accuracy_ratio", labels) is None  # not 0: no labels yet
    assert metrics.registry.get_sample_value("slimserve_offline_accuracy_ratio", labels) is None


def test_forget_removes_every_series_of_the_variant_and_only_those():
    metrics = Metrics()
    for variant in ("gone", "kept"):
        series = metrics.series("m", variant)
        series.request_duration.observe(0.001)
        values = ("m", variant, "cpu")
        for code in RESULT_CODES:
            metrics.requests.labels(*values, code).inc()
        metrics.feedback.labels(*values, "true").inc()
        metrics.feedback.labels(*values, "false").inc()
        metrics.online_accuracy.labels(*values).set(0.5)
        metrics.offline_accuracy.labels(*values).set(0.9)
        metrics.flops.labels(*values).set(1e6)
    before = _series_of(metrics.registry, "kept")
    assert "slimserve_feedback_total" in before
    metrics.forget("m", "gone")
    assert _series_of(metrics.registry, "gone") == set()
    assert _series_of(metrics.registry, "kept") == before
    metrics.forget("m", "never-loaded")  # nothing to remove is not an error
