"""Live statistics: latency windows and variant counters, online accuracy and shadow agreement, compare rows."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from slimserve.server.errors import InvalidArgument, NotFound
from slimserve.server.telemetry.statistics import FeedbackStore, LatencyWindow, VariantStats, compare_rows, cost_per_1000

# ---------------------------------------------------------------------- latency window


def test_latency_window_percentiles():
    window = LatencyWindow(capacity=1000)
    assert window.percentiles((50, 99)) == {50: None, 99: None}
    for i in range(1, 101):
        window.record(i / 1000.0)
    pct = window.percentiles((50, 90, 99))
    assert pct[50] == pytest.approx(0.0505)
    assert pct[90] == pytest.approx(0.0901)
    assert len(window.latencies()) == 100


def test_latency_window_keeps_only_the_most_recent_samples():
    window = LatencyWindow(capacity=10)
    for i in range(25):
        window.record(float(i))
    assert sorted(window.latencies()) == [float(i) for i in range(15, 25)]


def test_latency_window_records_from_many_threads():
    window = LatencyWindow(capacity=100_000)

    def work():
        for _ in range(5000):
            window.record(0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(window.latencies()) == 20_000


def test_variant_stats_count_requests_errors_and_batches():
    stats = VariantStats()
    assert stats.mean_batch is None
    stats.answered(0.002)
    stats.failed()
    stats.computed(4, 0.01)
    stats.computed(8, 0.03)
    assert (stats.requests, stats.errors, stats.batches, stats.samples) == (2, 1, 2, 12)
    assert stats.mean_batch == 6.0
    assert stats.device_seconds == pytest.approx(0.04)
    assert list(stats.window.latencies()) == [0.002]  # a failed request has no latency to compare


# ---------------------------------------------------------------------- feedback


def test_online_accuracy_counts_labels_per_variant():
    store = FeedbackStore()
    store.record_prediction("r1", "baseline", 3)
    store.record_prediction("r2", "baseline", 5)
    store.record_prediction("r3", "int8", 7)
    assert store.online_accuracy("baseline") is None  # no labels yet
    assert store.feedback("r1", 3).correct
    result = store.feedback("r2", 4)
    assert (result.variant, result.correct) == ("baseline", False)
    store.feedback("r3", 7)
    assert store.online_accuracy("baseline") == 0.5
    assert store.online_counts("int8") == (1, 1)


def test_shadow_agreement_is_counted_without_labels_and_shadows_are_scored_by_labels():
    store = FeedbackStore()
    store.record_prediction("r1", "baseline", 1, shadows={"int8": 1})
    store.record_prediction("r2", "baseline", 2, shadows={"int8": 9})
    store.record_prediction("r3", "baseline", 3)
    assert store.record_shadow("r3", "int8", 3)  # arrives after the answer was sent
    assert store.record_shadow("r3", "int8", 3)  # counted once per request
    assert not store.record_shadow("gone", "int8", 0)
    assert store.agreement_counts("int8") == (2, 3)
    assert store.shadow_agreement("int8") == pytest.approx(2 / 3)
    store.feedback("r2", 9)  # the shadow was right, the primary wrong
    assert store.online_counts("baseline") == (0, 1)
    assert store.online_counts("int8") == (1, 1)


def test_feedback_for_an_unknown_or_forgotten_id_is_not_found():
    store = FeedbackStore(capacity=3)
    for i in range(5):
        store.record_prediction(f"r{i}", "baseline", 0)
    assert len(store) == 3
    with pytest.raises(NotFound) as info:
        store.feedback("abc", 1)
    assert info.value.message == "no recent request with id 'abc' (ids are kept for the last 3 requests)"
    with pytest.raises(NotFound):
        store.feedback("r0", 0)  # evicted
    store.feedback("r4", 0)


def test_a_remembered_answer_costs_under_a_third_of_a_kilobyte():
    """The store holds `capacity` answers (100 000 by default): 8-row answers kept as two ndarrays cost 475 B each
    (46 MiB a model when full, which test_memory's servers saw as growth); as int32 bytes with the label marks made on
    the first label, 276 B; one-row answers 211 B. Python 3.11, 64-bit."""
    import tracemalloc

    n = 5000
    predicted = np.arange(8, dtype=np.int64) % 10
    store = FeedbackStore(capacity=n)
    tracemalloc.start()
    try:
        for i in range(n):
            store.record_rows(f"5f1d3c2a-{i}", "baseline", predicted)
        multi, _ = tracemalloc.get_traced_memory()
        single_store = FeedbackStore(capacity=n)
        for i in range(n):
            single_store.record_prediction(f"5f1d3c2a-{i}", "baseline", 3)
        both, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert multi / n < 320, f"{multi / n:.0f} B per 8-row answer"
    assert (both - multi) / n < 260, f"{(both - multi) / n:.0f} B per one-row answer"
    assert store.feedback("5f1d3c2a-7", labels=list(range(8))).correct_rows == 8  # the compact answer still takes its labels


def test_a_second_label_for_the_same_request_is_refused():
    store = FeedbackStore()
    store.record_prediction("abc", "baseline", 1)
    store.feedback("abc", 1)
    with pytest.raises(InvalidArgument, match="request 'abc' already has a label"):
        store.feedback("abc", 2)
    assert store.online_counts("baseline") == (1, 1)
    with pytest.raises(InvalidArgument, match="label must be an integer"):
        store.feedback("abc", 1.5)


def test_a_forgotten_variant_starts_from_zero_and_its_old_requests_are_unknown():
    store = FeedbackStore()
    store.record_prediction("r1", "int8", 1)
    store.record_prediction("r2", "baseline", 2, shadows={"int8": 2})
    store.record_prediction("r3", "int8", 3)
    store.feedback("r1", 1)
    store.forget_variant("int8")
    assert store.online_counts("int8") == (0, 0) and store.agreement_counts("int8") == (0, 0)
    with pytest.raises(NotFound):
        store.feedback("r3", 3)  # answered by the deleted variant: not scored for a new one of that name
    store.feedback("r2", 2)  # the primary's request stays; the forgotten shadow is no longer scored
    assert store.online_counts("baseline") == (1, 1) and store.online_counts("int8") == (0, 0)


# ---------------------------------------------------------------------- compare


def test_cost_per_1000_on_hand_numbers():
    # 36 device seconds at $2.48/h = $0.0248, spread over 200 requests -> $0.124 per 1000.
    assert cost_per_1000(36.0, 2.48, 200) == pytest.approx(0.124)
    assert cost_per_1000(1.0, 2.48, 0) is None


def _stats(latencies: np.ndarray, errors: int = 0, device_seconds: float = 0.0, batch: int = 1) -> VariantStats:
    """A variant's counters as the server keeps them: every latency one request, computed in calls of `batch` samples."""
    window = LatencyWindow()
    for v in latencies:
        window.record(float(v))
    n = len(latencies)
    return VariantStats(window, requests=n, errors=errors, batches=n, samples=n * batch, device_seconds=device_seconds)


def test_compare_rows_with_too_little_data_says_so():
    store = FeedbackStore()
    for i in range(12):
        store.record_prediction(f"b{i}", "baseline", 1)
        store.feedback(f"b{i}", 1)
        store.record_prediction(f"q{i}", "int8", 1)
        store.feedback(f"q{i}", 0 if i < 3 else 1)
    rows = compare_rows(
        ["int8", "baseline"],
        weights={"baseline": 0.7, "int8": 0.3},
        stats={"baseline": _stats(np.full(12, 0.004), device_seconds=0.036), "int8": _stats(np.full(12, 0.002), 1, 0.018)},
        price_per_hour=1.0,
        offline_accuracy={"baseline": 0.97, "int8": 0.96},
        feedback=store,
    )
    assert [r["variant"] for r in rows] == ["baseline", "int8"]
    base, int8 = rows
    assert base["latency_verdict"] is None and base["accuracy_verdict"] is None
    assert int8["latency_verdict"] == "not enough data (n=12 < 30)"
    assert int8["accuracy_verdict"] == "not enough data (n=12 < 30)"
    assert int8["online_accuracy"] == 0.75
    low, high = int8["online_accuracy_ci"]
    assert low < 0.75 < high
    assert int8["errors"] == 1 and base["errors"] == 0
    assert int8["latency_p50_ms"] == pytest.approx(2.0)
    assert int8["cost_per_1000"] == pytest.approx(0.018 / 3600 / 12 * 1000)
    json.dumps(rows)  # plain enough for `slimctl compare --json`


def test_compare_rows_with_enough_data_gives_verdicts_and_shadow_agreement():
    rng = np.random.default_rng(3)
    store = FeedbackStore()
    for i in range(400):
        store.record_prediction(f"r{i}", "baseline", i % 10, shadows={"int8": i % 10 if i % 5 else -1})
        store.feedback(f"r{i}", i % 10)
    rows = compare_rows(
        ["baseline", "int8", "pruned"],
        weights={"baseline": 1.0},
        shadows=("int8",),
        stats={
            "baseline": _stats(rng.lognormal(np.log(0.004), 0.2, 400), batch=4),
            "int8": _stats(rng.lognormal(np.log(0.002), 0.2, 400), batch=4),
        },
        price_per_hour=0.1,
        offline_accuracy={"baseline": 0.97},
        feedback=store,
    )
    by_name = {r["variant"]: r for r in rows}
    int8 = by_name["int8"]
    assert int8["shadow"] and int8["weight"] == 0.0
    assert int8["shadow_agreement"] == pytest.approx(0.8)
    assert int8["latency_verdict"] == "faster (p<0.001)"
    assert int8["accuracy_verdict"] == "less accurate (p<0.001)"
    assert int8["mean_batch"] == 4.0
    assert by_name["baseline"]["online_accuracy"] == 1.0
    pruned = by_name["pruned"]  # a variant with no traffic at all
    assert pruned["requests"] == 0 and pruned["cost_per_1000"] is None and pruned["latency_p50_ms"] is None
    assert pruned["latency_verdict"] == "not enough data (n=0 < 30)"
    assert pruned["offline_accuracy"] is None and pruned["online_accuracy_ci"] is None
