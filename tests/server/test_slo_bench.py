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


def test_the_summary_leaves_out_the_adjustment_and_counts_late_dropped_refused_and_shares():
    begin, end = 5.0, 5.0 + ADJUST_S + 10
    rows = [
        (begin + 1, "fp32", "ok", 9.0, -0.1),  # in the adjustment: not in the p99, but in throughput and shares
        *[(begin + ADJUST_S + i / 10, "int8", "ok", 0.010, -0.09) for i in range(99)],
        (begin + ADJUST_S + 9.95, "int8", "late", 0.200, 0.05),  # its compute ended 50 ms past its deadline
        (begin + ADJUST_S + 9.96, "int8", "late", 0.130, -0.001),  # computed in time, answered 30 ms late
        (begin + 2, "fp32", "deadline", 0.1, 0.0),
        (1.0, "fp32", "refused", 0.0, 0.0),  # before the step: counted over the whole run
    ]
    s = summarize({"rows": rows}, (begin, end), drop_pt=0.5, slo_ms=100.0)
    assert (s["late"], s["late_compute"], s["dropped_at_deadline"], s["refused"]) == (2, 1, 1, 1) and s["requests"] == len(rows)
    assert s["worst_late_ms"] == pytest.approx(100.0)
    assert s["int8_share"] == pytest.approx(101 / 102) and s["accuracy_cost_pt"] == pytest.approx(0.5 * 101 / 102)
    assert 10 < s["p99_ms"] < 200 and s["throughput_rps"] == pytest.approx(102 / (end - begin))


def test_the_server_bench_counts_the_clients_own_deadline_apart_from_late_answers_and_server_drops():
    from bench.slo_server import summarize as summarize_server

    begin, end = 2.0, 2.0 + ADJUST_S + 5
    rows = [
        *[(begin + ADJUST_S + i / 100, "int8", "ok", 0.010, 0.0) for i in range(98)],
        (begin + ADJUST_S + 1.5, "baseline", "late", 0.300, 0.0),  # an answer after its deadline (a REST-like timeout)
        (begin + 1, "", "client_deadline", 0.100, 0.0),  # gRPC's own DEADLINE_EXCEEDED: not a late answer
        (begin + 1, "", "late_dropped", 0.100, 0.0),  # computed, answered DEADLINE_EXCEEDED by the server
        (begin + 2, "", "dropped", 0.050, 0.0),
        (1.0, "", "refused", 0.001, 0.0),
        (1.0, "", "error UNAVAILABLE: gone", 0.001, 0.0),
    ]
    s = summarize_server(rows, (begin, end), drop_pt=0.5, adjust_s=ADJUST_S)
    assert (s["late"], s["client_deadline_exceeded"], s["late_dropped"], s["dropped_at_deadline"], s["refused"]) == (1, 1, 1, 1, 1)
    assert s["errors"] == 1 and s["first_error"] == "error UNAVAILABLE: gone" and s["requests"] == len(rows)
    assert s["int8_share"] == pytest.approx(98 / 99) and s["throughput_rps"] == pytest.approx(99 / (end - begin))
    assert 10 < s["p99_ms"] < 300


def test_the_server_bench_tells_the_reserve_for_the_send_from_other_refusals_and_drops():
    import grpc

    from bench.slo_server import _outcome

    exhausted, deadline = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED
    assert _outcome(exhausted, "variant 'int8' of model 'm': ... up to 9 ms after compute to leave the server ...") == "refused_send"
    assert _outcome(exhausted, "variant 'int8' of model 'm': queue full (3 requests waiting)") == "refused"
    assert _outcome(deadline, "variant 'int8' of model 'm': ... up to 9 ms after compute to leave the server ...") == "dropped_send"
    assert _outcome(deadline, "variant 'int8' of model 'm': the request's deadline passed 3 ms ago") == "dropped"
    assert _outcome(deadline, "variant 'int8' of model 'm': the request was computed in time, but its answer came back") == "late_dropped"
    assert _outcome(deadline, "Deadline Exceeded") == "client_deadline"  # gRPC's own, no server message
