"""VariantRecorder: the families it counts in plain numbers export exactly what prometheus_client's own objects would."""

from __future__ import annotations

import sys
import threading

from prometheus_client import CollectorRegistry, generate_latest

from slimserve.server.telemetry.metrics import PER_VARIANT, VARIANT_LABELS, Metrics
from slimserve.server.telemetry.recording import VariantRecorder

LABELS = ("m", "v", "cpu")


def _reference() -> tuple[CollectorRegistry, dict]:
    """The collected families as prometheus_client objects, as server/telemetry/metrics.py made them before they were collected."""
    registry = CollectorRegistry()
    made = {}
    for family in PER_VARIANT:
        if family.collected:
            options = {"buckets": family.buckets} if family.buckets is not None else {}
            labels = (*VARIANT_LABELS, *(n for n, _ in family.extra))
            made[family.attr] = family.kind(family.name, family.help, labels, registry=registry, **options)
    return registry, made


def _exposition(registry: CollectorRegistry, families: set[str]) -> list[str]:
    """The text format's lines of `families`, without the _created samples (when a child was made differs)."""
    lines = generate_latest(registry).decode().splitlines()
    keep = [line for line in lines if not line.startswith("#") and "_created" not in line]
    return sorted(
        line for line in keep if line.split("{")[0].removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") in families
    )


def test_exported_samples_equal_prometheus_clients_for_the_same_observations():
    price = 3.6  # dollars per hour: a cent per 10 s
    metrics = Metrics(price_per_hour=price)
    recorder = VariantRecorder(metrics, *LABELS[:2])
    registry, ref = _reference()
    ok = ref["requests"].labels(*LABELS, "OK")
    ok.inc(0)
    # Values on bucket bounds (le is inclusive), between them, past the last, and zero.
    latencies = [0.0, 0.0001, 0.00010001, 0.00025, 0.003, 0.0049, 0.005, 1.0, 9.99, 10.0, 12.5, 0.07]
    for i, seconds in enumerate(latencies):
        code = "OK" if i % 4 else "INVALID_ARGUMENT"
        recorder.begin()
        ref["inflight"].labels(*LABELS).inc()
        recorder.record(code, seconds)
        ref["inflight"].labels(*LABELS).dec()
        ref["request_duration"].labels(*LABELS).observe(seconds)
        ref["requests"].labels(*LABELS, code).inc()
    recorder.begin()  # one still in flight
    ref["inflight"].labels(*LABELS).inc()
    for size, queue, compute in [(1, [0.0], 0.00003), (8, [0.001, 0.0025, 0.2], 0.004), (300, [0.01], 2.0), (2, [], 0.00025)]:
        recorder.record_batch(size, queue, compute)
        ref["batch_size"].labels(*LABELS).observe(size)
        for seconds in queue:
            ref["queue_duration"].labels(*LABELS).observe(seconds)
        ref["compute_duration"].labels(*LABELS).observe(compute)
        ref["samples"].labels(*LABELS).inc(size)
        ref["cost"].labels(*LABELS).inc(compute * price / 3600.0)
    names = {f.name.removesuffix("_total") for f in PER_VARIANT if f.collected} | {f.name for f in PER_VARIANT if f.collected}
    ours, theirs = _exposition(metrics.registry, names), _exposition(registry, names)
    assert len(ours) > 60
    assert ours == theirs


def test_created_series_are_exported_as_prometheus_client_does():
    metrics = Metrics()
    recorder = VariantRecorder(metrics, *LABELS[:2])
    recorder.record("INTERNAL", 0.1)
    labels = dict(zip(VARIANT_LABELS, LABELS))
    get = metrics.registry.get_sample_value
    assert get("slimserve_requests_created", {**labels, "code": "OK"}) == recorder.created
    assert get("slimserve_requests_created", {**labels, "code": "INTERNAL"}) >= recorder.created
    assert get("slimserve_request_duration_seconds_created", labels) == recorder.created
    assert get("slimserve_inflight_requests", labels) == -1  # a gauge: no _created
    assert get("slimserve_inflight_requests_created", labels) is None


def test_a_scrape_while_batcher_threads_record_sees_whole_calls_and_no_count_is_lost():
    metrics = Metrics()
    recorder = VariantRecorder(metrics, *LABELS[:2])
    n, threads = 5_000, 3
    torn: list[dict] = []
    done = threading.Event()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can

    def batches() -> None:
        for _ in range(n):
            recorder.record_batch(2, [0.001, 0.001], 0.001)

    def scrapes() -> None:  # the metrics thread: each copy must hold whole calls (2 samples, 2 waits, 1 compute each)
        while not done.is_set():
            counts = recorder.counts()
            calls = sum(counts["batch_size"][0])
            if (sum(counts["queue_duration"][0]), counts["samples"], sum(counts["compute_duration"][0])) != (2 * calls, 2 * calls, calls):
                torn.append(counts)

    try:
        scraper = threading.Thread(target=scrapes)
        scraper.start()
        workers = [threading.Thread(target=batches) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        done.set()
        scraper.join()
    finally:
        sys.setswitchinterval(interval)
    assert torn == []
    labels = dict(zip(VARIANT_LABELS, LABELS))
    get = metrics.registry.get_sample_value
    assert get("slimserve_batch_size_count", labels) == n * threads
    assert get("slimserve_queue_duration_seconds_count", labels) == 2 * n * threads
    assert get("slimserve_inferences_total", labels) == 2 * n * threads
    stats = recorder.stats
    assert (stats.batches, stats.samples, stats.queued) == (n * threads, 2 * n * threads, 2 * n * threads)
