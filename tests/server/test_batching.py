"""The dynamic batcher: merging and splitting, limits, low-load latency, overload, cancellation, errors, drain."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.batching.batcher import DynamicBatcher
from slimserve.server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from slimserve.server.runtimes import create_runtime

BLOCK = -1.0  # a request whose first value is BLOCK holds the model until the test opens the gate
FAIL = -2.0  # a call that contains FAIL raises


class FakeModel:
    """A deterministic model: y = 2x + 1 row by row, plus outputs without a batch dimension."""

    def __init__(self, compute_s: float = 0.0) -> None:
        self.compute_s = compute_s
        self.calls: list[int] = []  # samples per call, in call order
        self.seen: list[np.ndarray] = []  # the merged 'x' of every call
        self.running = 0
        self.max_running = 0
        self.gate = threading.Event()
        self.blocked = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.calls.append(x.shape[0] if x.ndim else 1)
            self.seen.append(x.copy())
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if x.flat[0] == BLOCK:
                self.blocked.set()
                assert self.gate.wait(10), "test never opened the gate"
            if self.compute_s:
                time.sleep(self.compute_s)
            if (x == FAIL).any():
                raise ValueError("model failed on this batch")
            result = {
                "y": x * 2 + 1,
                "scale": np.array(3.0, np.float32),  # no batch dimension: shared whole
                "table": np.arange(5, dtype=np.int64),  # dim 0 is not the batch: shared whole
            }
            return {k: v for k, v in result.items() if not outputs or k in outputs}
        finally:
            with self._lock:
                self.running -= 1


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="compute") as pool:
        yield pool


def sample(rows: int, value: float | None = None, cols: int = 4, dtype=np.float32) -> np.ndarray:
    if value is not None:
        return np.full((rows, cols), value, dtype)
    return np.random.default_rng(rows * 1000 + cols).normal(size=(rows, cols)).astype(dtype)


async def wait_blocked(model: FakeModel) -> None:
    while not model.blocked.is_set():  # noqa: ASYNC110  a threading.Event, set by a compute thread
        await asyncio.sleep(0.001)


def test_merged_results_equal_alone_and_sizes_split_back(executor):
    model = FakeModel()
    batcher = DynamicBatcher(model, executor, BatchingConfig(), model="m", variant="v")
    sizes = [1, 3, 7, 2, 1]
    xs = [sample(n, cols=4) + i for i, n in enumerate(sizes)]

    async def main():
        return await asyncio.gather(*(batcher.submit({"x": x}, None) for x in xs))

    results = run(main())
    assert model.calls == [sum(sizes)]  # one call for all: they arrived together
    for x, got in zip(xs, results):
        alone = model({"x": x}, None)
        assert got["y"].shape == (x.shape[0], 4)
        np.testing.assert_array_equal(got["y"], alone["y"])  # exactly, not approximately
        np.testing.assert_array_equal(got["scale"], alone["scale"])
        np.testing.assert_array_equal(got["table"], np.arange(5))


def test_incompatible_requests_are_not_merged(executor):
    model = FakeModel()
    batcher = DynamicBatcher(model, executor, BatchingConfig(), model="m", variant="v")
    requests = [
        ({"x": sample(1, 1.0, cols=4)}, None),
        ({"x": sample(1, 2.0, cols=5)}, None),  # other non-batch shape
        ({"x": sample(1, 3.0, cols=4, dtype=np.float64)}, None),  # other dtype
        ({"x": sample(1, 4.0, cols=4)}, ["y"]),  # other outputs
        ({"x": sample(1, 5.0, cols=4)}, None),  # merges with the first
        ({"x": np.array(6.0, np.float32)}, None),  # no batch dimension: alone
    ]

    async def main():
        return await asyncio.gather(*(batcher.submit(i, o) for i, o in requests))

    results = run(main())
    merged = [sorted(set(x.reshape(-1).tolist())) for x in model.seen]
    assert sorted(merged) == [[1.0, 5.0], [2.0], [3.0], [4.0], [6.0]]
    for (inputs, outputs), got in zip(requests, results):
        np.testing.assert_array_equal(got["y"], inputs["x"] * 2 + 1)
        assert got["y"].dtype == inputs["x"].dtype
        assert set(got) == ({"y"} if outputs else {"y", "scale", "table"})


def test_max_batch_size_is_respected_and_a_large_request_runs_alone_unsplit(executor):
    model = FakeModel()
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_batch_size=4), model="m", variant="v")
    xs = [sample(1, float(i)) for i in range(10)] + [sample(9, 100.0)]

    async def main():
        return await asyncio.gather(*(batcher.submit({"x": x}, None) for x in xs))

    results = run(main())
    assert model.calls == [4, 4, 2, 9]
    assert results[-1]["y"].shape == (9, 4)
    for x, got in zip(xs, results):
        np.testing.assert_array_equal(got["y"], x * 2 + 1)


def test_preferred_batch_sizes_cut_the_batch(executor):
    model = FakeModel()
    config = BatchingConfig(max_batch_size=8, preferred_batch_sizes=(4,))
    batcher = DynamicBatcher(model, executor, config, model="m", variant="v")

    async def main():
        await asyncio.gather(*(batcher.submit({"x": sample(1, float(i))}, None) for i in range(10)))

    run(main())
    assert model.calls == [4, 4, 2]


def test_a_lone_request_is_not_delayed(executor):
    # A queue delay far longer than the call: a lone request must not wait for it.
    model = FakeModel()
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_queue_delay_ms=200.0), model="m", variant="v")
    unbatched = DynamicBatcher(model, executor, BatchingConfig(enabled=False), model="m", variant="v")

    async def latencies(b: DynamicBatcher) -> list[float]:
        out = []
        for i in range(30):
            start = time.perf_counter()
            await b.submit({"x": sample(1, float(i))}, None)
            out.append(time.perf_counter() - start)
        return out

    on, off = run(latencies(batcher)), run(latencies(unbatched))
    assert statistics.median(on) < 0.002, f"median {statistics.median(on) * 1e3:.2f} ms"
    assert statistics.median(on) < statistics.median(off) + 0.001
    assert max(on) < 0.1  # never the 200 ms delay
    assert set(model.calls) == {1}


def test_concurrent_callers_fill_batches(executor):
    model = FakeModel(compute_s=0.002)
    batcher = DynamicBatcher(model, executor, BatchingConfig(), model="m", variant="v", max_concurrency=2)
    observed: list[tuple[int, int]] = []
    batcher.on_batch = lambda size, queue, compute: observed.append((size, len(queue)))

    async def caller(c: int) -> None:
        for i in range(10):
            x = sample(1, float(c * 100 + i))
            got = await batcher.submit({"x": x}, None)
            np.testing.assert_array_equal(got["y"], x * 2 + 1)
            await asyncio.sleep(0.0005 * (c % 3))  # callers out of step

    async def main():
        await asyncio.gather(*(caller(c) for c in range(16)))

    run(main())
    assert sum(model.calls) == 160
    assert statistics.mean(model.calls) > 1.5, model.calls
    assert model.max_running <= 2
    assert sorted(size for size, _ in observed) == sorted(model.calls)
    assert all(size == n for size, n in observed)  # single-sample requests: one queue time per sample


def test_full_queue_answers_resource_exhausted_at_once_and_keeps_serving(executor):
    model = FakeModel()
    drops: list[str] = []
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_queue_size=3), model="digits", variant="int8", on_drop=drops.append)

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)  # the only call slot is busy: what comes next waits
        queued = [asyncio.create_task(batcher.submit({"x": sample(1, float(i))}, None)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.queued == 3
        start = time.perf_counter()
        with pytest.raises(ResourceExhausted) as info:
            await batcher.submit({"x": sample(1, 9.0)}, None)
        assert time.perf_counter() - start < 0.01
        assert info.value.message == (
            "variant 'int8' of model 'digits': queue full (3 requests waiting); retry later or raise max_queue_size"
        )
        model.gate.set()
        await asyncio.gather(running, *queued)
        after = await batcher.submit({"x": sample(1, 7.0)}, None)
        np.testing.assert_array_equal(after["y"], sample(1, 15.0))

    run(main())
    assert model.calls == [1, 3, 1]
    assert drops == ["full"]  # counted as shed: the SLO loop sees a full queue as it sees a refusal for the deadline


def test_cancelled_request_is_dropped_before_it_runs(executor):
    model = FakeModel()
    batcher = DynamicBatcher(model, executor, BatchingConfig(), model="m", variant="v")

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        gone = asyncio.create_task(batcher.submit({"x": sample(1, 42.0)}, None))
        kept = asyncio.create_task(batcher.submit({"x": sample(1, 1.0)}, None))
        await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):  # a deadline passing cancels the wait
            await asyncio.wait_for(gone, 0.001)
        assert batcher.queued == 1
        model.gate.set()
        await running
        np.testing.assert_array_equal((await kept)["y"], sample(1, 3.0))

    run(main())
    assert not any((x == 42.0).any() for x in model.seen)
    assert model.calls == [1, 1]


def test_a_failing_call_fails_its_whole_batch_and_later_requests_work(executor):
    model = FakeModel()
    batcher = DynamicBatcher(model, executor, BatchingConfig(), model="m", variant="v")

    async def main():
        outcomes = await asyncio.gather(*(batcher.submit({"x": sample(1, v)}, None) for v in (1.0, FAIL, 3.0)), return_exceptions=True)
        assert model.calls == [3]
        assert all(isinstance(o, ValueError) and "model failed" in str(o) for o in outcomes)
        later = await asyncio.gather(*(batcher.submit({"x": sample(1, v)}, None) for v in (1.0, 2.0)))
        assert [float(r["y"][0, 0]) for r in later] == [3.0, 5.0]

    run(main())


def test_close_drains_what_is_queued_then_refuses(executor):
    model = FakeModel()
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_queue_delay_ms=500.0), model="m", variant="v")

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        queued = [asyncio.create_task(batcher.submit({"x": sample(1, float(i))}, None)) for i in range(3)]
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match="variant 'v' of model 'm' is unloading"):
            await batcher.submit({"x": sample(1, 5.0)}, None)
        assert not closing.done()
        model.gate.set()
        await closing
        assert all(t.done() for t in [running, *queued])
        assert [float(t.result()["y"][0, 0]) for t in queued] == [1.0, 3.0, 5.0]

    run(main())
    assert model.calls == [1, 3]


def test_disabled_runs_each_request_alone(executor):
    model = FakeModel(compute_s=0.001)
    seen: list[int] = []
    batcher = DynamicBatcher(
        model, executor, BatchingConfig(enabled=False), model="m", variant="v", on_batch=lambda n, q, c: seen.append(n)
    )
    xs = [sample(n) for n in (1, 2, 1, 3)]

    async def main():
        results = await asyncio.gather(*(batcher.submit({"x": x}, ["y"]) for x in xs))
        await batcher.close()
        return results

    for x, got in zip(xs, run(main())):
        np.testing.assert_array_equal(got["y"], x * 2 + 1)
    assert sorted(model.calls) == [1, 1, 2, 3] and sorted(seen) == [1, 1, 2, 3]


def test_config_round_trips_and_rejects_nonsense():
    config = BatchingConfig(max_batch_size=16, max_queue_delay_ms=0.5, preferred_batch_sizes=(8, 4, 8), max_queue_size=64)
    assert config.preferred_batch_sizes == (4, 8)
    assert BatchingConfig.from_dict(config.to_dict()) == config
    assert BatchingConfig.from_dict({}) == BatchingConfig()
    with pytest.raises(InvalidArgument, match="out of range: \\[64\\]"):
        BatchingConfig(max_batch_size=32, preferred_batch_sizes=(64,))
    with pytest.raises(InvalidArgument, match="unknown setting"):
        BatchingConfig.from_dict({"max_batch": 8})
    with pytest.raises(InvalidArgument, match="max_batch_size must be >= 1"):
        BatchingConfig(max_batch_size=0)


def test_digits_onnx_batched_equals_unbatched(digits, executor):
    runtime = create_runtime("onnxruntime", digits.onnx)
    runtime.load()
    x = digits.x_test[:40]
    sizes = [1, 3, 7, 1, 2, 8, 1, 5, 4, 8]  # 40 samples, in calls of at most 16
    offsets = np.cumsum([0, *sizes])
    model_calls: list[int] = []
    batcher = DynamicBatcher(
        runtime.predict,
        executor,
        BatchingConfig(max_batch_size=16),
        model="digits",
        variant="baseline",
        on_batch=lambda n, q, c: model_calls.append(n),
    )

    async def main():
        return await asyncio.gather(*(batcher.submit({"x": x[a:b]}, ["logits"]) for a, b in itertools.pairwise(offsets)))

    results = run(main())
    assert max(model_calls) > 1 and max(model_calls) <= 16 and sum(model_calls) == 40
    for (a, b), got in zip(itertools.pairwise(offsets), results):
        alone = runtime.predict({"x": x[a:b]}, ["logits"])["logits"]
        assert got["logits"].shape == (b - a, 10)
        # Kernels may differ with the batch size by a rounding error, never by an answer.
        np.testing.assert_allclose(got["logits"], alone, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["logits"].argmax(1), alone.argmax(1))


class ThreadRecordingModel(FakeModel):
    """FakeModel that also records which thread ran each call."""

    def __init__(self, compute_s: float = 0.0) -> None:
        super().__init__(compute_s)
        self.threads: list[str] = []

    def __call__(self, inputs, outputs):
        self.threads.append(threading.current_thread().name)
        return super().__call__(inputs, outputs)


@pytest.mark.parametrize("enabled", [True, False], ids=["batching", "no-batching"])
# The inline threshold is far above a no-op call (50 ms), so that a loaded machine cannot push its measured mean over it.
@pytest.mark.parametrize("inline_below_s, compute_s, expect_loop", [(0.05, 0.0, True), (0.0, 0.0, False), (0.5e-3, 0.003, False)])
def test_short_calls_run_on_the_loop_thread_even_under_load_and_long_ones_on_the_pool(
    executor, enabled, inline_below_s, compute_s, expect_loop
):
    model = ThreadRecordingModel(compute_s)
    batcher = DynamicBatcher(model, executor, BatchingConfig(enabled=enabled, max_batch_size=4), inline_below_s=inline_below_s)

    async def go():
        loop_thread = threading.current_thread().name
        await batcher.submit({"x": sample(1)})  # the first call is measured on the pool: nothing is known yet
        for _ in range(5):  # then 16 requests at once, so that requests wait while calls run
            results = await asyncio.gather(*(batcher.submit({"x": sample(1, float(i))}) for i in range(16)))
            for i, r in enumerate(results):
                np.testing.assert_allclose(r["y"], sample(1, float(i)) * 2 + 1)
        await batcher.close()
        return loop_thread

    loop_thread = run(go())
    assert model.threads[0].startswith("compute")
    later = model.threads[1:]
    assert max(model.calls) <= 4 and sum(model.calls) == 1 + 5 * 16
    if expect_loop:
        assert set(later) == {loop_thread}, later
    else:
        assert all(t.startswith("compute") for t in later), later


def test_a_short_call_to_an_idle_batcher_runs_at_once_as_its_own_batch(executor):
    model = FakeModel()
    seen: list[tuple[int, list[float]]] = []
    # A generous bound: the fake call takes microseconds, but a loaded CI machine can stall its first timing past 0.5 ms.
    batcher = DynamicBatcher(
        model, executor, BatchingConfig(), inline_below_s=50e-3, on_batch=lambda size, queued, compute: seen.append((size, queued))
    )

    async def go():
        await batcher.submit({"x": sample(1)})  # measured on the pool first
        result = await batcher.submit({"x": sample(3, 1.0)})
        np.testing.assert_allclose(result["y"], sample(3, 1.0) * 2 + 1)
        with pytest.raises(ValueError, match="model failed"):
            await batcher.submit({"x": sample(2, FAIL)})
        assert batcher.queued == 0
        await batcher.close()

    run(go())
    assert model.calls == [1, 3, 2]
    assert seen[1:] == [(3, [0.0]), (2, [0.0])]  # the failed call is observed too


def test_batch_key_counts_samples_by_dim_0_and_one_where_inputs_cannot_batch():
    # What a call counts as, queued or run at once: dim 0 where every input has it and they agree, else 1.
    from slimserve.server.batching.assembly import batch_key

    f = np.float32
    cases = [
        {"x": np.zeros((3, 4), f)},
        {"x": np.zeros((1,), f)},
        {"x": np.zeros((), f)},
        {"x": np.zeros((0, 4), f)},
        {"a": np.zeros((2, 4), f), "b": np.zeros((2,), np.int64)},
        {"a": np.zeros((2, 4), f), "b": np.zeros((5,), np.int64)},
        {"a": np.zeros((2, 4), f), "b": np.zeros((), np.int64)},
        {"a": np.zeros((), f), "b": np.zeros((3,), np.int64)},
        {"a": np.zeros((0, 4), f), "b": np.zeros((0,), np.int64)},
        {},
    ]
    assert [batch_key(c, None)[1] for c in cases] == [3, 1, 1, 1, 2, 2, 2, 1, 1, 1]


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_before_compute_and_answered_deadline_exceeded(executor):
    model = FakeModel()
    drops: list[str] = []
    batcher = DynamicBatcher(model, executor, BatchingConfig(), model="m", variant="v", on_drop=drops.append)

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        late = asyncio.create_task(batcher.submit({"x": sample(1, 42.0)}, None, deadline=time.perf_counter() + 0.02))
        kept = asyncio.create_task(batcher.submit({"x": sample(1, 1.0)}, None, deadline=time.perf_counter() + 30))
        cancelled = asyncio.create_task(batcher.submit({"x": sample(1, 43.0)}, None))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(DeadlineExceeded, match=r"deadline passed .* not computed.*'timeout' parameter"):
            await late  # answered at its deadline, while the call before it still runs
        assert batcher.queued == 1 and not running.done()
        with pytest.raises(DeadlineExceeded, match="deadline"):  # already past when it arrives: refused at once
            await batcher.submit({"x": sample(1, 44.0)}, None, deadline=time.perf_counter() - 0.001)
        model.gate.set()
        await running
        np.testing.assert_array_equal((await kept)["y"], sample(1, 3.0))

    run(main())
    assert not any(np.isin(x, (42.0, 43.0, 44.0)).any() for x in model.seen)
    assert model.calls == [1, 1] and sorted(drops) == ["cancelled", "deadline", "deadline"]


def test_an_expired_request_is_taken_out_when_its_batch_is_cut_even_before_its_timer(executor):
    model = FakeModel()
    drops: list[str] = []
    batcher = DynamicBatcher(model, executor, BatchingConfig(), model="m", variant="v", on_drop=drops.append)

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        waiting = [
            asyncio.create_task(batcher.submit({"x": sample(1, v)}, None, deadline=time.perf_counter() + d))
            for v, d in ((5.0, 0.05), (6.0, 30))
        ]
        await asyncio.sleep(0.01)
        time.sleep(0.06)  # noqa: ASYNC251  the loop is blocked on purpose past the first one's deadline: its timer cannot fire before the batch is cut
        model.gate.set()
        await running
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert isinstance(outcomes[0], DeadlineExceeded)
        np.testing.assert_array_equal(outcomes[1]["y"], sample(1, 13.0))

    run(main())
    assert not any((x == 5.0).any() for x in model.seen) and drops == ["deadline"]


def test_a_request_whose_deadline_the_queue_ahead_cannot_meet_is_refused_at_once_with_resource_exhausted(executor):
    model = FakeModel(compute_s=0.02)
    drops: list[str] = []
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_batch_size=1), model="m", variant="v", on_drop=drops.append)

    async def main():
        await batcher.submit({"x": sample(1, 1.0)}, None)  # measured: 20 ms a sample
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        ahead = [asyncio.create_task(batcher.submit({"x": sample(1, 2.0)}, None)) for _ in range(5)]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted, match=r"5 samples wait ahead .* expected in \d+ ms .* refused rather than queued"):
            await batcher.submit({"x": sample(1, 3.0)}, None, deadline=time.perf_counter() + 0.05)  # 5 x 20 ms > 50 ms
        fits = asyncio.create_task(batcher.submit({"x": sample(1, 4.0)}, None, deadline=time.perf_counter() + 30))
        model.gate.set()
        await asyncio.gather(running, *ahead)
        np.testing.assert_array_equal((await fits)["y"], sample(1, 9.0))

    run(main())
    assert not any((x == 3.0).any() for x in model.seen) and drops == ["refused"]


def test_a_request_whose_call_would_likely_end_past_its_deadline_is_dropped_at_the_cut_not_answered_late(executor):
    model = FakeModel()
    drops: list[str] = []
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_batch_size=1), model="m", variant="v", on_drop=drops.append)
    for _ in range(10):
        batcher.sizer.observe(1, 0.2)  # one call in ten took 200 ms ...
    for _ in range(90):
        batcher.sizer.observe(1, 0.02)  # ... most 20 ms: the typical cost is 20 ms, the likely (95th percentile) 200 ms

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        # Admitted: about 20 ms for the running call, then up to 200 ms of its own, fits in 300 ms.
        tight = asyncio.create_task(batcher.submit({"x": sample(1, 5.0)}, None, deadline=time.perf_counter() + 0.3))
        loose = asyncio.create_task(batcher.submit({"x": sample(1, 6.0)}, None, deadline=time.perf_counter() + 30))
        await asyncio.sleep(0.15)  # the running call overruns: at the cut, about 150 ms are left, less than 200
        model.gate.set()
        await running
        with pytest.raises(DeadlineExceeded, match=r"deadline is \d+ ms away, but its call would likely take 200 ms"):
            await tight
        np.testing.assert_array_equal((await loose)["y"], sample(1, 13.0))

    run(main())
    assert not any((x == 5.0).any() for x in model.seen) and drops == ["deadline"]


def test_an_answer_ready_after_its_deadline_is_answered_deadline_exceeded_not_sent_late(executor):
    """Its call overran (a stall the estimate could not foresee): computed, but the caller gets DeadlineExceeded, counted
    'late'; a request of the same batch whose deadline is still ahead gets its answer."""
    model = FakeModel()
    drops: list[str] = []
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_batch_size=4), model="m", variant="v", on_drop=drops.append)

    async def main():
        blocked = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None, deadline=time.perf_counter() + 0.05))
        in_time = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None, deadline=time.perf_counter() + 30))
        await wait_blocked(model)
        await asyncio.sleep(0.08)  # the call runs past the first deadline
        model.gate.set()
        with pytest.raises(DeadlineExceeded, match=r"computed, but its answer was ready \d+ ms after its deadline.*'timeout'"):
            await blocked
        assert (await in_time)["y"].shape == (1, 4)

    run(main())
    assert model.calls == [2] and drops == ["late"]


@pytest.mark.parametrize("enabled", [False, True], ids=["unbatched", "inline"])
def test_an_unbatched_or_inline_call_past_its_deadline_is_answered_deadline_exceeded(executor, enabled):
    model = FakeModel(compute_s=0.05)
    drops: list[str] = []
    batcher = DynamicBatcher(
        model,
        executor,
        BatchingConfig(enabled=enabled),
        model="m",
        variant="v",
        on_drop=drops.append,
        inline_below_s=1.0 if enabled else 0.0,
    )

    async def main():
        await batcher.submit({"x": sample(1, 1.0)}, None)  # measured (and, inline_below_s=1 s, inline from now on)
        with pytest.raises(DeadlineExceeded, match="computed, but its answer was ready"):
            await batcher.submit({"x": sample(1, 2.0)}, None, deadline=time.perf_counter() + 0.01)
        assert (await batcher.submit({"x": sample(1, 3.0)}, None, deadline=time.perf_counter() + 30))["y"].shape == (1, 4)

    run(main())
    assert model.calls == [1, 1, 1] and drops == ["late"]


def test_the_cut_does_not_grow_a_batch_past_the_earliest_deadline_of_its_members(executor):
    """Calls cost 100 ms a sample: a request with 260 ms left (at the head) rides in a call of 2 (about 200 ms), not of 3
    or 4 (300, 400 ms); the two behind it, not dropped, run in the next call. The old cut dropped it (a call of 4 ends past it)."""
    model = FakeModel()
    drops: list[str] = []
    config = BatchingConfig(max_batch_size=4, preferred_batch_sizes=[4])  # the cut is 4 but for the deadline
    batcher = DynamicBatcher(model, executor, config, model="m", variant="v", on_drop=drops.append)
    for size in (1, 2, 4):
        for _ in range(10):
            batcher.sizer.observe(size, 0.1 * size)

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        tight = asyncio.create_task(batcher.submit({"x": sample(1, 6.0)}, None, deadline=time.perf_counter() + 0.26))
        rest = [asyncio.create_task(batcher.submit({"x": sample(1, v)}, None)) for v in (5.0, 7.0, 8.0)]
        await asyncio.sleep(0.01)
        model.gate.set()
        outcomes = await asyncio.gather(running, tight, *rest)
        assert [float(o["y"][0, 0]) for o in outcomes[1:]] == [13.0, 11.0, 15.0, 17.0]

    run(main())
    assert model.calls == [1, 2, 2], model.calls
    assert drops == []


def test_an_answer_that_comes_back_to_its_caller_after_the_deadline_is_not_sent(executor):
    """The dataplane calls check_in_time after `submit` returns: an answer ready in time but resumed late by a busy
    event loop is answered DeadlineExceeded (counted 'late'); one in time passes."""
    drops: list[str] = []
    batcher = DynamicBatcher(FakeModel(), executor, BatchingConfig(), model="m", variant="v", on_drop=drops.append)
    batcher.check_in_time(time.perf_counter() + 30)
    with pytest.raises(DeadlineExceeded, match=r"computed in time, but its answer came back to it \d+ ms after its deadline"):
        batcher.check_in_time(time.perf_counter() - 0.005, ended=time.perf_counter() - 0.05)
    assert drops == ["late"]
    assert 0.05 <= batcher.answer_time._recent[0][1] < 1  # not sent, but at least that long after compute: a sample


def _answers_take(batcher: DynamicBatcher, seconds: float) -> None:
    """Ten answers that left the server `seconds` after their call ended (what the transports report)."""
    for _ in range(10):
        batcher.answer_left(time.perf_counter() - seconds, "the gRPC context")


def test_a_request_whose_answer_would_leave_after_its_deadline_is_refused_or_dropped_before_compute(executor):
    """Calls take 20 ms, answers 100 ms after compute (a busy loop, encoding, sending): a request whose compute would
    end in time but whose answer would not is refused on arrival, or dropped by its timer at its deadline less those
    100 ms, counted 'send'; never computed. One with room for both is answered."""
    model = FakeModel()
    drops: list[str] = []
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_batch_size=1), model="m", variant="v", on_drop=drops.append)
    for _ in range(10):
        batcher.sizer.observe(1, 0.02)
    _answers_take(batcher, 0.1)

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        with pytest.raises(ResourceExhausted, match=r"compute is expected to end in \d+ ms, but .* up to 100 ms after compute"):
            await batcher.submit({"x": sample(1, 3.0)}, None, deadline=time.perf_counter() + 0.08)
        admitted = asyncio.create_task(batcher.submit({"x": sample(1, 5.0)}, None, deadline=time.perf_counter() + 0.2))
        loose = asyncio.create_task(batcher.submit({"x": sample(1, 6.0)}, None, deadline=time.perf_counter() + 30))
        with pytest.raises(DeadlineExceeded, match=r"deadline is \d+ ms away; .* up to 100 ms after compute to leave the server"):
            await admitted  # the running call overran: at 100 ms before its deadline it is dropped, still queued
        model.gate.set()
        await running
        np.testing.assert_array_equal((await loose)["y"], sample(1, 13.0))

    run(main())
    assert not any(np.isin(x, (3.0, 5.0)).any() for x in model.seen) and drops == ["send", "send"]


def test_the_predicted_wait_is_the_running_call_and_the_samples_ahead_at_their_typical_cost(executor):
    """What the SLO loop reads: the same typical costs admission uses, not the cheapest (a cheap first call must not
    hide a queue of typical ones)."""
    model = FakeModel()
    batcher = DynamicBatcher(model, executor, BatchingConfig(max_batch_size=1), model="m", variant="v")
    assert batcher.predicted_wait() is None  # nothing measured yet
    batcher.sizer.observe(1, 0.001)  # one cheap call, then typical ones of 10 ms
    for _ in range(30):
        batcher.sizer.observe(1, 0.010)

    async def main():
        running = asyncio.create_task(batcher.submit({"x": sample(1, BLOCK)}, None))
        await wait_blocked(model)
        queued = [asyncio.create_task(batcher.submit({"x": sample(1, 1.0)}, None)) for _ in range(4)]
        await asyncio.sleep(0)
        wait = batcher.predicted_wait()  # four ahead at 10 ms, and the running call's 10 ms less what it has run
        model.gate.set()
        await asyncio.gather(running, *queued)
        return wait

    wait = run(main())
    assert 0.039 <= wait <= 0.051 and batcher.predicted_wait() == 0.0
