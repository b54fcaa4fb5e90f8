"""bench/bench_slo.py's bookkeeping: the arrivals follow the load step, and the summary counts what the JSON reports."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_slo import ADJUST_S, arrivals, summarize


def test_arrivals_follow_the_step_rate():
    times = arrivals(lambda t: 300.0 if 2 <= t < 4 else 100.0, 6.0, seed=0)
    assert np.all(np.diff(times) > 0) and times[-1] < 6.0
    base, step = np.sum(times < 2), np.sum((times >= 2) & (times < 4))
    assert 150 < base < 250 and 500 < step < 700


def test_the_summary_leaves_out_the_adjustment_and_counts_late_dropped_and_shares():
    begin, end = 5.0, 5.0 + ADJUST_S + 10
    rows = [
        (begin + 1, "fp32", "ok", 9.0),  # in the adjustment: not in the p99, but in throughput and shares
        *[(begin + ADJUST_S + i / 10, "int8", "ok", 0.010) for i in range(99)],
        (begin + ADJUST_S + 9.95, "int8", "late", 0.200),
        (begin + 2, "fp32", "deadline", 0.1),
        (1.0, "fp32", "refused", 0.0),  # before the step
    ]
    s = summarize({"rows": rows}, (begin, end), drop_pt=0.5)
    assert s["late"] == 1 and s["dropped"] == 1 and s["requests"] == len(rows)
    assert s["int8_share"] == pytest.approx(100 / 101) and s["accuracy_cost_pt"] == pytest.approx(0.5 * 100 / 101)
    assert 10 < s["p99_ms"] < 200 and s["throughput_rps"] == pytest.approx(101 / (end - begin))
