"""Unload returns memory: 20 variants created, loaded, routed to and deleted under load leave the server's RSS within 5%.

The server keeps each model's last `--feedback-ids` answers for later labels, a store that grows with the requests served
until it is full (0.27 KB an 8-row answer: 26 MiB at the default 100 000, which this load fills in a few minutes; its
cost per answer is held by tests/server/test_stats.py). Here it is kept small so that it is full before the first
measurement and what is measured is the variants' churn: with the default, the store's filling read as a 22-35% growth
that was blamed on optimizer jobs (they serve more traffic while they run since they moved to worker processes)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tests.helpers import ServerProcess, wait_until

CYCLES = 20
WARMUP = 3  # the first jobs import the optimizer and grow pools and arenas once; measured from after them
FEEDBACK_IDS = 1000  # full within the warm-up (thousands of requests a cycle)


@pytest.mark.slow
def test_creating_and_deleting_20_variants_under_load_returns_memory(tmp_path, digits):
    # The jobs run under 4 callers that never pause, where the job yield would hold each worker to 1 slice in 20
    # (tests/server/test_throttle.py has the yield) and SCHED_IDLE (--job-nice 19) to the cores' idle moments, which
    # these callers leave none of (the test took 100 s, 58 s at nice 0): both off, as what is measured here is what
    # the variants leave behind.
    server = ServerProcess(
        tmp_path / "repo", tmp_path / "server.log", "--feedback-ids", str(FEEDBACK_IDS), "--job-yield", "off", "--job-nice", "0"
    )
    errors: list[Exception] = []
    answered: Counter[str] = Counter()
    stop = threading.Event()
    try:
        with server.client() as c:
            c.register("digits", digits.onnx)

        def caller() -> None:
            with server.client() as c:
                while not stop.is_set():
                    try:
                        answered[c.infer("digits", {"x": digits.x_test[:8]})[0]] += 1
                    except Exception as e:
                        errors.append(e)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        rss = []
        with server.client() as c:
            for i in range(WARMUP + CYCLES):
                if i == WARMUP:
                    rss.append(server.settled_rss())
                name = f"v{i}"
                c.optimize("digits", "graph-ort", variant_name=name)
                c.traffic("digits", {"baseline": 50, name: 50})
                target = answered[name] + 20
                wait_until(lambda name=name, target=target: answered[name] >= target or errors, f"20 answers from {name}", 60)
                c.delete_variant("digits", name)
            rss.append(server.settled_rss())
            assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        server.stop()
    assert errors == [], errors[:3]
    start, end = rss
    growth = (end - start) / start
    print(f"server RSS after warm-up {start / 2**20:.1f} MiB, after {CYCLES} more variants {end / 2**20:.1f} MiB ({growth:+.1%})")
    assert growth < 0.05, f"RSS grew {growth:.1%}: {start / 2**20:.1f} -> {end / 2**20:.1f} MiB"
