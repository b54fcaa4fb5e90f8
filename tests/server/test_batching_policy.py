"""The batch-size policy: measured cost per sample decides where a batch is cut and whether a free call slot waits."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.batching.batcher import DynamicBatcher
from slimserve.server.batching.sizing import ANSWER_REFRESH, COST_AGE_S, BatchSizer, TailWindow, group_of, top_of


class CostModel:
    """y = 2x + 1, taking `cost(n)` seconds for a call of n samples (a sleep: it holds no core, like a well-threaded runtime)."""

    def __init__(self, cost) -> None:
        self.cost = cost
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.calls.append(x.shape[0])
        time.sleep(self.cost(x.shape[0]))
        return {"y": x * 2 + 1}


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="compute") as pool:
        yield pool


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def x_of(value: float) -> np.ndarray:
    return np.full((1, 4), value, np.float32)


def trained(per_call) -> BatchSizer:
    """A sizer that has seen calls of 1, 2, 4, 8, 16 and 32 samples costing per_call(n) seconds."""
    sizer = BatchSizer(32)
    for n in (1, 2, 4, 8, 16, 32):
        sizer.observe(n, per_call(n))
    return sizer


def test_groups_are_powers_of_two():
    assert [group_of(n) for n in (1, 2, 3, 4, 7, 8, 31, 32)] == [0, 1, 1, 2, 2, 3, 4, 5]
    assert [top_of(g) for g in range(4)] == [1, 3, 7, 15]


def test_linear_cost_takes_what_waits_and_never_waits():
    sizer = trained(lambda n: 0.002 * n)
    assert sizer.cut(20) == 20 and sizer.cut(32) == 32 and sizer.cut(100) == 32
    assert not any(sizer.worth_waiting(n) for n in range(1, 33))


def test_sublinear_cost_takes_what_waits_and_waits_for_more():
    sizer = trained(lambda n: 0.002 + 0.0001 * n)  # a fixed overhead per call: batching pays
    assert sizer.cut(5) == 5 and sizer.cut(40) == 32
    assert sizer.worth_waiting(1) and sizer.worth_waiting(6)
    assert not sizer.worth_waiting(32)


def test_superlinear_cost_cuts_small_batches():
    sizer = trained(lambda n: 0.002 * n**1.5)  # batch 16 costs 4x batch 1 per sample (a big encoder leaving the cache)
    assert sizer.cut(32) == 1 and sizer.cut(3) == 1
    assert not sizer.worth_waiting(1)


def test_merging_pays_only_when_measured_cheaper_per_sample():
    assert not trained(lambda n: 0.002 * n).pays(8)
    assert trained(lambda n: 0.002 + 0.0001 * n).pays(8)
    assert BatchSizer(32).pays(8)  # no evidence: merge, as a batcher without an estimate does


def test_an_unmeasured_size_is_tried_one_step_at_a_time():
    sizer = BatchSizer(32)
    sizer.observe(1, 0.01)
    assert sizer.cut(32) == 3  # 2-3 is next to try, never 32 on a guess
    sizer.observe(3, 0.03)
    assert sizer.cut(32) == 7
    sizer.observe(6, 0.09)  # 4-7 costs 1.5x per sample: the cut stays below it
    assert sizer.cut(32) == 3


def test_a_long_first_batch_is_checked_against_one_sample():
    sizer = BatchSizer(32)
    sizer.observe(8, 3.0)  # a burst met a fresh server: 8 samples of a big encoder in one 3 s call
    assert sizer.cut(8) == 1  # not 8 again on the strength of one guess
    sizer.observe(1, 0.3)  # one sample costs less per sample than 8 did
    assert sizer.cut(8) == 3
    short = BatchSizer(32)
    short.observe(8, 0.001)  # a short call: a wrong size costs little, and sizes vary by themselves
    assert short.cut(8) == 8


def test_likely_cost_is_a_high_quantile_of_recent_calls_and_typical_cost_their_moving_average():
    sizer = BatchSizer(16)
    assert sizer.likely_cost(4) is None and sizer.typical_cost(4) is None  # nothing measured
    sizer.observe(4, 4 * 0.5)  # one slow first call alone is not trusted: the cheapest recent cost stands in
    assert sizer.likely_cost(4) == pytest.approx(4 * 0.5)
    sizer.observe(1, 0.010)
    assert sizer.likely_cost(4) == pytest.approx(4 * 0.010)
    sizer._recent = [deque((t - COST_AGE_S - 1, c) for t, c in calls) for calls in sizer._recent]  # both age out
    assert sizer.likely_cost(4) is None  # forgotten: a variant that dropped every request since runs calls again
    sizer = BatchSizer(16)
    for _ in range(10):
        sizer.observe(4, 4 * 0.040)  # one call in ten is slow (a neighbour, a stall) ...
    for _ in range(90):
        sizer.observe(4, 4 * 0.010)  # ... the other nine take 10 ms a sample
    assert sizer.likely_cost(4) == pytest.approx(4 * 0.040)  # the 95th percentile of the last 100 calls
    assert sizer.typical_cost(4) == pytest.approx(4 * 0.010, rel=0.01)
    assert sizer.likely_cost(16) == pytest.approx(16 * 0.040)  # an unmeasured group: the highest measured cost
    for _ in range(100):
        sizer.observe(4, 4 * 0.010)  # the slow calls leave the window
    assert sizer.likely_cost(4) == pytest.approx(4 * 0.010)


def test_the_time_after_compute_is_a_high_quantile_of_recent_answers_forgotten_when_old():
    tail = TailWindow()
    now = time.perf_counter()
    for _ in range(9):
        tail.add(0.5, now)
    assert tail.high(now) == 0.0  # nine answers are too little evidence: nothing is reserved
    for i in range(91):
        tail.add(0.001 * (i % 10), now)  # 91 answers of 0-9 ms, after the nine slow ones
    assert tail.high(now) == 0.5  # the 95th percentile of the last 100: the slow ones are in it
    for _ in range(ANSWER_REFRESH - 1):
        tail.add(0.001, now)
    assert tail.high(now) == 0.5  # not computed again before ANSWER_REFRESH new answers (a sort per request otherwise)
    tail.add(0.001, now)
    assert tail.high(now) == pytest.approx(0.009)  # the slow ones left the window of 100
    assert tail.high(now + COST_AGE_S + 1) == 0.0 and len(tail) == 0  # all aged out: a stall is forgotten


def test_a_stale_estimate_is_tried_again_now_and_then():
    sizer = BatchSizer(32, explore_every=10)
    for _ in range(4):
        sizer.observe(1, 0.01)
        sizer.observe(2, 0.02)
        sizer.observe(4, 0.08)  # measured under a noisy neighbour
    cuts = []
    for _ in range(20):
        cuts.append(sizer.cut(8))
        sizer.observe(1, 0.01)
    assert 7 in cuts and cuts.count(3) >= 15


def frozen(per_call) -> BatchSizer:
    """A trained sizer that ignores later calls: the test fixes the costs (sleeps overshoot on a loaded machine)."""
    sizer = trained(per_call)
    sizer.observe = lambda size, compute_s: None  # type: ignore[method-assign]
    return sizer


def test_with_linear_cost_a_free_slot_does_not_wait_for_the_delay(executor):
    # Two slots, a 300 ms delay, calls that cost n times a single one: a request arriving while one call
    # runs gains nothing from waiting for company, so it takes the free slot at once and calls overlap.
    # (Under a fixed delay it would wait for the running call to end, then ride with the next request.)
    model = CostModel(lambda n: 0.05 * n)
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_queue_delay_ms=300.0), model="m", variant="v", max_concurrency=2)
    batcher.sizer = frozen(lambda n: 0.05 * n)
    latencies: list[float] = []

    async def caller(c: int) -> None:
        await asyncio.sleep(0.01 * c)  # out of step: one arrives while the other's call runs
        for i in range(8):
            start = time.perf_counter()
            got = await batcher.submit({"x": x_of(c * 100 + i)}, None)
            latencies.append(time.perf_counter() - start)
            np.testing.assert_array_equal(got["y"], x_of(c * 100 + i) * 2 + 1)

    async def main():
        await asyncio.gather(caller(0), caller(1))

    run(main())
    assert model.calls == [1] * 16, model.calls  # two requests waiting with both slots free run side by side
    assert statistics.median(latencies) < 0.09, f"median {statistics.median(latencies) * 1e3:.0f} ms for a 50 ms call"


async def three_staggered(batcher: DynamicBatcher) -> None:
    """One request, then two more 5 ms apart while it runs: the second finds a call slot free."""
    first = asyncio.create_task(batcher.submit({"x": x_of(0)}, None))
    await asyncio.sleep(0.005)
    rest = [asyncio.create_task(batcher.submit({"x": x_of(1)}, None))]
    await asyncio.sleep(0.005)
    rest.append(asyncio.create_task(batcher.submit({"x": x_of(2)}, None)))
    await asyncio.gather(first, *rest)


def test_with_sublinear_cost_a_free_slot_waits_and_batches_form(executor):
    # A fixed 100 ms per call whatever its size: once measured, a request that finds a free slot while
    # another call runs waits (up to the delay) for company.
    model = CostModel(lambda n: 0.1)
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_queue_delay_ms=300.0), model="m", variant="v", max_concurrency=2)
    batcher.sizer = frozen(lambda n: 0.1)

    run(three_staggered(batcher))
    assert model.calls == [1, 2]


def test_without_evidence_a_free_slot_starts_at_once(executor):
    model = CostModel(lambda n: 0.02 * n)
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_queue_delay_ms=60.0), model="m", variant="v", max_concurrency=2)
    batcher.sizer = frozen(lambda n: 0.02 * n)

    run(three_staggered(batcher))
    assert model.calls == [1, 1, 1]


def test_superlinear_cost_under_load_runs_small_batches_and_serves_more(executor):
    # 8 callers, one slot, a call of n costing 10 ms x n^2: merging everything that waits (7 samples,
    # 490 ms) serves a sample per 70 ms; cutting at the measured best serves one per 10 ms.
    def serve(batcher: DynamicBatcher) -> float:
        async def caller(c: int) -> None:
            for i in range(10):
                await batcher.submit({"x": x_of(c * 100 + i)}, None)

        async def main() -> float:
            await batcher.submit({"x": x_of(-1)}, None)  # a first call at low load: batch 1 measured
            start = time.perf_counter()
            await asyncio.gather(*(caller(c) for c in range(8)))
            return time.perf_counter() - start

        return run(main(), timeout=60)

    model = CostModel(lambda n: 0.01 * n * n)
    seconds = serve(DynamicBatcher(model, executor, BatchingConfig(), model="m", variant="v"))
    assert sum(model.calls) == 1 + 8 * 10
    assert statistics.median(model.calls) == 1, model.calls
    assert sum(n > 3 for n in model.calls) <= 1, model.calls  # tried one step up, the 7 that waited at most once
    assert seconds < 3.0, f"{seconds:.2f} s for 80 requests (merging all that waits: about 5.6 s)"
