"""Triton's ModelStatistics counters in VariantStats: cumulative, in nanoseconds, per executed batch size."""

from __future__ import annotations

from slimserve.server.telemetry.statistics import VariantStats


def test_counters_add_up_per_request_and_per_batch():
    stats = VariantStats()
    stats.computed(4, 0.002, [0.001, 0.003])  # one call of 4 samples holding two requests
    stats.computed(1, 0.001, [0.0])
    stats.computed(4, 0.004, [0.002])
    stats.answered(0.010)
    stats.answered(0.020)
    stats.failed(0.005)
    assert (stats.batches, stats.samples, stats.queued) == (3, 9, 4)
    assert stats.queue_ns == 6_000_000 and stats.infer_ns == 2 * 2_000_000 + 1_000_000 + 4_000_000
    assert stats.batch_sizes == {4: [2, 6_000_000], 1: [1, 1_000_000]}
    assert (stats.requests, stats.errors, stats.success_ns, stats.fail_ns) == (3, 1, 30_000_000, 5_000_000)
    assert stats.last_inference_ms > 0
