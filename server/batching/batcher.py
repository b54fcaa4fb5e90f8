"""The dynamic batcher of one loaded variant: merges concurrent requests along dim 0 into one model call.

Semantics follow Triton's dynamic batcher:

- Requests merge when they have the same input names, dtypes and non-batch shapes (everything but
  dim 0) and ask for the same outputs. Requests of different batch sizes (1, 3, 7, ...) merge into
  one call while the total stays <= `max_batch_size`; one request larger than that runs alone, unsplit.
  A request whose inputs have no batch dimension (a scalar input, or inputs disagreeing on dim 0)
  is never merged with anything.
- A call starts as soon as `max_batch_size` samples of one kind wait, or at once when this variant has
  no call running (a lone request under low load is not delayed; under load, requests gather while the
  running call computes). With a call running and a slot free, requests wait for others (at most
  `max_queue_delay_ms`) only when measured calls show a larger batch is cheaper per sample.
- How many of the waiting samples a call takes is measured, not assumed (`batch_sizing.BatchSizer`,
  fed by every call's compute time): the largest batch size whose cost per sample is near the best
  measured, so a model whose batch-8 call costs 8x its batch-1 call (or more) runs small batches.
  With `preferred_batch_sizes`, a batch is cut at the largest preferred size that the waiting samples
  can fill, and a call starts as soon as one can be filled rather than waiting for the delay.
- The oldest waiting request is always in the next call, so no kind of request starves; a younger
  request only overtakes an older incompatible one by riding in the batch of an even older request.
- At most `max_concurrency` calls of this variant run at once, so batches fill under load.
- Results are split back by offsets: every output whose dim 0 equals the batch's total is sliced
  (each request gets a view of its rows); an output without a batch dimension (a scalar, or any
  output whose dim 0 differs from the total) is given whole to every request of the batch. An
  output whose dim 0 only happens to equal the total is taken for batched: models whose outputs
  are not batched along dim 0 should be served with batching off. A call of one request returns
  the model's outputs untouched.
- At most `max_queue_size` requests wait; beyond that `submit` raises ResourceExhausted at once.
- A request cancelled before its batch starts is dropped and never computed (one cancelled while
  its batch runs is computed, its answer discarded); if the model raises, every request of that
  batch gets the exception.
- A request with a deadline that the work ahead cannot let it meet is refused at once with ResourceExhausted rather
  than queued past its deadline: the running calls and the samples waiting (at their typical measured cost, spread
  over the call slots), then its own call at its likely cost (BatchSizer.likely_cost: the 95th percentile of recent
  calls of its size), end after it.
- A request may carry a deadline (`time.perf_counter()` seconds: gRPC's deadline, or the `timeout`
  parameter): one already past is refused at once, and one that passes while it waits is taken out
  of the queue at that moment (a timer), or at the latest when its batch is cut (also when a call of its own size, at
  its likely cost, would end past the deadline), and answered
  DeadlineExceeded; it is never computed. A batch is not grown past the size whose likely cost would end after the
  earliest deadline of its members: the cut stops there and the rest go in the next call (rather than being dropped).
- Every one of those checks reserves, before the deadline, the time this variant's answers take after compute (handed
  back to the event loop, resumed, encoded, sent: `answer_time`, a high quantile of recent answers to requests with a
  deadline, reported by the transports through `answer_left`): a request whose compute would end in time but whose answer
  would leave after its deadline is refused (or dropped) before compute too, counted 'send'.
- An answer ready after its request's deadline (its call overran the likely cost: a stall) is answered DeadlineExceeded,
  never sent late: a gRPC caller has its DEADLINE_EXCEEDED from gRPC already, a REST caller with a `timeout` gets 504.
  Drops, late answers and cancelled ones reach `on_drop` with the reason ('deadline', 'cancelled', 'late', 'send', 'full'
  for a full queue, or 'refused' for a refusal on arrival), which the loader counts in slimserve_queue_dropped_total.
  `close()` refuses new requests, finishes the queued ones, then returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable

import numpy as np

from slimserve.server.batching.assembly import BatchingConfig, batch_key, split_outputs
from slimserve.server.batching.sequence import SequencePlan
from slimserve.server.batching.sizing import BatchSizer, TailWindow
from slimserve.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

Predict = Callable[[dict[str, np.ndarray], "list[str] | None"], dict[str, np.ndarray]]
OnBatch = Callable[[int, list[float], float], None]
OnDrop = Callable[[str], None]
DEADLINE_SLACK_S = 0.02  # a cancel this close to the request's deadline is counted as the deadline passing


class _Request:
    __slots__ = ("deadline", "enqueued", "future", "inputs", "key", "outputs", "queued", "size", "timer", "timing")

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
        key: Hashable,
        size: int,
        future: asyncio.Future,
        deadline: float | None = None,
        timing: list | None = None,
    ) -> None:
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None
        self.timing = timing  # a traced request's list: its batch's (compute start, compute seconds, size) is appended
        self.inputs = inputs
        self.outputs = outputs
        self.key = key
        self.size = size
        self.future = future
        self.enqueued = time.perf_counter()
        self.queued = True  # False once taken into a batch (or dropped)


class DynamicBatcher:
    """Merges the concurrent requests of one variant into batched `predict` calls on `executor`."""

    def __init__(
        self,
        predict: Predict,
        executor: concurrent.futures.Executor,
        config: BatchingConfig | None = None,
        *,
        model: str = "",
        variant: str = "",
        max_concurrency: int = 1,
        on_batch: OnBatch | None = None,
        inline_below_s: float = 0.0,
        on_drop: OnDrop | None = None,
        sequence: SequencePlan | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.predict = predict
        self.executor = executor
        self.config = config or BatchingConfig()
        self.model = model
        self.variant = variant
        self.max_concurrency = max_concurrency
        self.on_batch = on_batch
        self.on_drop = on_drop
        # Calls whose recent compute time (a moving average) is below this run on the event loop's
        # thread: for a model of tens of microseconds, handing a call to a worker thread and back (a
        # thread wake-up, the GIL changing hands twice, a self-pipe write) costs more than the call.
        # Measured on the digits CNN (python -m bench.bench_inline): about 10% more requests per
        # second and 10% less server CPU per request at 4 and 16 callers than handing every call
        # off. While an inline call runs the loop
        # does not receive, but gRPC's own threads do: the requests that arrive meanwhile form the
        # next batch. Larger calls go to the compute pool so that the loop keeps serving. 0: never.
        self.inline_below_s = inline_below_s
        self._compute_ewma: float | None = None
        self._delay = self.config.max_queue_delay_ms / 1000.0
        # Cost per sample by batch size, from every executed call: where to cut a batch, and whether to wait (batch_sizing.py).
        self.sizer = BatchSizer(self.config.max_batch_size)
        # The time an answer takes after its call ended (handed back, resumed, encoded, sent: the server's own time outside
        # the queue), a high quantile of recent answers to requests with a deadline (the dataplane and the transports feed
        # it: `answer_left`): reserved before every deadline, so that an answer computed in time but leaving late is
        # refused or dropped before compute instead (reason 'send').
        self.answer_time = TailWindow()
        # key -> requests of that kind in arrival order; the oldest head overall goes first.
        self._queues: dict[Hashable, deque[_Request]] = {}
        self._samples: dict[Hashable, int] = {}
        self._waiting = 0  # requests queued (enabled) or submitted and unfinished (disabled)
        self._inflight = 0  # calls running
        self._calls: dict[int, tuple[float, int]] = {}  # id of a running batch -> (when it was cut, its samples)
        self._closing = False
        self._wakeup = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._dispatcher: asyncio.Task | None = None
        self._kick_pending = False
        self._idle: asyncio.Event | None = None  # disabled mode: set when nothing runs
        # A text model served padding-free (batching/sequence.py): each request cut to its real length before it is keyed,
        # so requests of similar length merge; set per instance, so that other models' submit pays nothing for it.
        self.sequence = sequence
        if sequence is not None:
            self.submit = self._submit_cut  # type: ignore[method-assign]

    # ------------------------------------------------------------------ public

    @property
    def queued(self) -> int:
        """Requests waiting for a call (for tests and a queue-depth gauge)."""
        return self._waiting

    def predicted_wait(self) -> float | None:
        """Seconds a request arriving now would wait before its compute starts, as admission predicts it (`_ahead`): the
        running calls until a slot frees and the samples queued ahead, at their typical measured cost over the call slots;
        None: nothing measured yet. The SLO loop reads it to answer a load spike before the live p99's window fills."""
        if self.sizer.typical_cost(1) is None:
            return None
        slot, queue, _ = self._ahead(time.perf_counter())
        return slot + queue

    def answer_left(self, ended: float, *_: object) -> None:
        """The answer of a request with a deadline, whose call ended at `ended` (perf_counter), has left the server now
        (a transport calls it once the answer is sent: gRPC's done callback, which passes its context, or after the REST
        body is encoded): one sample of `answer_time`."""
        now = time.perf_counter()
        self.answer_time.add(now - ended, now)

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None, deadline: float | None = None, timing: list | None = None
    ) -> dict[str, np.ndarray]:
        """Runs one request, merged with others where it can; returns its own outputs. `deadline`: perf_counter seconds
        by which it must be answered; past it, DeadlineExceeded instead of compute. `timing` (a traced request's, or one
        with a deadline): the call that computed it appends (compute start perf_counter, seconds, batch size)."""
        if deadline is not None and time.perf_counter() >= deadline:
            self._dropped("deadline")
            raise DeadlineExceeded(self._expired(deadline))
        if self._closing:
            raise Unavailable(f"{self._who()} is unloading and takes no new requests; retry the request")
        if self._waiting >= self.config.max_queue_size:
            self._dropped("full")  # shed as much as a refusal for the deadline: the SLO loop counts it
            raise ResourceExhausted(f"{self._who()}: queue full ({self._waiting} requests waiting); retry later or raise max_queue_size")
        # A short call runs at once on the loop thread: with batching off always, with it on when nothing waits or runs.
        if self._runs_inline() and (not self.config.enabled or not (self._waiting or self._inflight)):
            return self._run_now(inputs, outputs, timing, deadline)
        if not self.config.enabled:
            return await self._submit_unbatched(inputs, outputs, deadline, timing)
        loop = asyncio.get_running_loop()
        key, size = batch_key(inputs, outputs)
        if deadline is not None and (self._waiting or self._inflight):
            refusal = self._refusal(deadline, size)
            if refusal is not None:
                self._dropped(refusal[0])
                raise ResourceExhausted(refusal[1])
        request = _Request(inputs, outputs, key, size, loop.create_future(), deadline, timing)
        if deadline is not None:
            now = time.perf_counter()
            request.timer = loop.call_later(max(self._last_start(request, now) - now, 0.0), self._on_timer, request)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._samples[key] = 0
        queue.append(request)
        self._samples[key] += size
        self._waiting += 1
        self._poke(loop)
        try:
            return await request.future
        except asyncio.CancelledError:
            if request.queued:  # not started yet: drop it so that it is never computed
                self._unqueue(request)
                self._wakeup.set()
                # A gRPC client cancels at its own deadline, which runs ahead of the server's copy by the request's
                # travel: a cancel that close to the deadline is the deadline's.
                late = request.deadline is not None and time.perf_counter() >= request.deadline - DEADLINE_SLACK_S
                self._dropped("deadline" if late else "cancelled")
            raise

    async def _submit_cut(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None, deadline: float | None = None, timing: list | None = None
    ) -> dict[str, np.ndarray]:
        """`submit` of a padding-free variant: trailing padding cut before batching, sequence outputs padded back."""
        cut = self.sequence.cut(inputs)
        if cut is None:
            return await DynamicBatcher.submit(self, inputs, outputs, deadline, timing)
        trimmed, full, keep = cut
        return self.sequence.pad_back(await DynamicBatcher.submit(self, trimmed, outputs, deadline, timing), full, keep)

    async def close(self) -> None:
        """Stops accepting (new submits raise Unavailable), finishes what is queued and running, then returns."""
        self._closing = True
        if not self.config.enabled:
            if self._idle is not None and self._waiting:
                await self._idle.wait()
            return
        if self._dispatcher is None and (self._waiting or self._inflight):
            self._start_dispatcher()  # calls started from a callback: the dispatcher waits for them to finish
        if self._dispatcher is not None:
            self._wakeup.set()
            await asyncio.shield(self._dispatcher)

    def _poke(self, loop: asyncio.AbstractEventLoop) -> None:
        """Something changed: with a slot free, start due batches at the end of this loop iteration
        (so that requests arriving together still merge) by a plain callback rather than a task
        switch; waits on a delay, and draining on close, are the dispatcher task's."""
        if self._dispatcher is not None:
            self._wakeup.set()
        elif not self._kick_pending and self._waiting:
            self._kick_pending = True
            loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_pending = False
        if self._dispatcher is not None:
            self._wakeup.set()
            return
        wait = self._start_due_batches() if self._inflight < self.max_concurrency else None
        if wait is not None:  # a batch waits for its delay: the dispatcher keeps the timer from now on
            self._start_dispatcher()

    def _start_dispatcher(self) -> None:
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=f"batcher {self.model}/{self.variant}")

    # ------------------------------------------------------------------ batching off

    async def _submit_unbatched(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, deadline: float | None = None, timing: list | None = None
    ) -> dict[str, np.ndarray]:
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()
        self._waiting += 1
        enqueued = time.perf_counter()
        try:
            result, started, compute = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._timed_predict, inputs, outputs, deadline
            )
            self._record_compute(compute)
            _, size = batch_key(inputs, outputs)
            self._observe(size, [started - enqueued], compute)
            if timing is not None:
                timing.append((started, compute, size))
            self._check_answer_in_time(deadline, started, compute)
            return result
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._idle.set()

    def _runs_inline(self) -> bool:
        return self._compute_ewma is not None and self._compute_ewma < self.inline_below_s

    def _record_compute(self, compute: float) -> None:
        """The moving average of call times that decides which calls run inline."""
        self._compute_ewma = compute if self._compute_ewma is None else 0.8 * self._compute_ewma + 0.2 * compute

    def _run_now(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, timing: list | None = None, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """A short call runs at once on the loop thread: no future, no kick, no second loop iteration
        (to an idle batcher: a scratch A/B on the digits CNN over gRPC, 6 rounds, gave about 5% more
        requests per second and 5% less server CPU per request at 16 callers, unary and streamed).
        It counts as a batch of its own size that did not queue, failed or not."""
        started = time.perf_counter()
        try:
            result = self.predict(inputs, outputs)
        finally:
            compute = time.perf_counter() - started
            self._record_compute(compute)
            _, size = batch_key(inputs, outputs)
            self._observe(size, [0.0], compute)
            if timing is not None:
                timing.append((started, compute, size))
        self._check_answer_in_time(deadline, started, compute)
        return result

    def _timed_predict(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, deadline: float | None = None
    ) -> tuple[dict[str, np.ndarray], float, float]:
        started = time.perf_counter()
        if deadline is not None and started >= deadline:  # it waited in the compute pool's queue past its deadline
            self._dropped("deadline")
            raise DeadlineExceeded(self._expired(deadline))
        result = self.predict(inputs, outputs)
        return result, started, time.perf_counter() - started

    # ------------------------------------------------------------------ batching on: the loop side

    def _who(self) -> str:
        return f"variant '{self.variant}' of model '{self.model}'"

    def _expired(self, deadline: float) -> str:
        late = (time.perf_counter() - deadline) * 1000
        return (
            f"{self._who()}: the request's deadline passed {late:.0f} ms ago while it waited in the queue ({self._waiting} "
            "waiting); it was not computed. Give it a longer deadline (gRPC timeout, or the 'timeout' parameter in "
            "microseconds), or send less load"
        )

    def _ahead(self, now: float) -> tuple[float, float, int]:
        """(seconds until a call slot frees: the running call nearest its typical end, 0 with a slot free; seconds the
        samples queued ahead take at their typical cost over the call slots; those samples)."""
        slot = 0.0
        if self._inflight >= self.max_concurrency and self._calls:
            slot = min(max((self.sizer.typical_cost(n) or 0.0) - (now - started), 0.0) for started, n in self._calls.values())
        ahead = sum(self._samples.values())
        queue = 0.0
        if ahead:
            per_call = max(1, min(ahead, self.config.max_batch_size))
            queue = (self.sizer.typical_cost(per_call) or 0.0) * ahead / per_call / self.max_concurrency
        return slot, queue, ahead

    def _refusal(self, deadline: float, size: int) -> tuple[str, str] | None:
        """Why a request arriving now cannot make its deadline, as (reason, message) (None: it may): the calls running and
        the samples waiting ahead of it at their typical measured cost, then its own call at its likely (high-quantile)
        cost, then its answer's time after compute (`answer_time`), end after the deadline. Typical for the work ahead,
        since a sum of calls varies less than one; likely for its own, the call whose overrun would make it late. The
        reason is 'send' when the compute alone would end in time. Nothing measured: None (it is taken, and checked again
        when its batch is cut)."""
        own = self.sizer.likely_cost(size)
        if own is None:
            return None
        now = time.perf_counter()
        slot, queue, ahead = self._ahead(now)
        ends = now + slot + queue + own
        if ends > deadline:
            reason = "refused"
        else:
            send = self.answer_time.high(now)
            if ends + send <= deadline:
                return None
            return "send", (
                f"{self._who()}: {ahead} samples wait ahead of this request and {self._inflight} call(s) run; its compute "
                f"is expected to end in {(ends - now) * 1000:.0f} ms, but this variant's answers take up to {send * 1000:.0f} "
                "ms after compute to leave the server (a high quantile of recent ones: handed back, encoded, sent), past "
                f"its deadline in {max(deadline - now, 0) * 1000:.0f} ms: refused rather than answered late; retry later, "
                "give it a longer deadline, or send less load"
            )
        return reason, (
            f"{self._who()}: {ahead} samples wait ahead of this request and {self._inflight} call(s) run; its answer is "
            f"expected in {(slot + queue + own) * 1000:.0f} ms ({(slot + queue) * 1000:.0f} ms before its compute starts, "
            f"up to {own * 1000:.0f} ms of compute), past its deadline in {max(deadline - now, 0) * 1000:.0f} ms: refused "
            "rather than queued past it; retry later, give it a longer deadline, or send less load"
        )

    def _late_by(self, request: _Request, now: float, cap: int) -> float | None:
        """The likely cost (seconds) of a call of `cap` samples carrying `request`, when that call, and then its answer's
        time after compute (`answer_time`), would end after the request's deadline (or the deadline has passed); None: no
        deadline, or in time. Computed only for a request with a deadline, so that requests without one pay nothing for it."""
        if request.deadline is None:
            return None
        cost = self.sizer.likely_cost(max(cap, request.size)) or 0.0
        return cost if request.deadline <= now + cost + self.answer_time.high(now) else None

    def _fits(self, earliest: float | None, request: _Request, now: float, total: int) -> bool:
        """Whether a call of `total` samples (the batch so far plus `request`) would likely end before the earliest
        deadline among them (`earliest`: the batch's so far, None: none): a batch is not grown past its members' deadlines."""
        if request.deadline is not None:
            earliest = request.deadline if earliest is None else min(earliest, request.deadline)
        if earliest is None:
            return True
        return now + (self.sizer.likely_cost(total) or 0.0) + self.answer_time.high(now) < earliest

    def _last_start(self, request: _Request, now: float) -> float:
        """The latest moment a queued request's call may start: its deadline less its own call at its likely cost and its
        answer's time after compute (what its batch's cut checks)."""
        return request.deadline - (self.sizer.likely_cost(request.size) or 0.0) - self.answer_time.high(now)

    def _on_timer(self, request: _Request) -> None:
        """A queued request's timer, set at `_last_start`: dropped now, as its cut would drop it, unless the estimates
        shrank since (then the timer is set again)."""
        request.timer = None
        if not request.queued:
            return
        now = time.perf_counter()
        until = self._last_start(request, now)
        if now < until:
            request.timer = asyncio.get_running_loop().call_later(until - now, self._on_timer, request)
            return
        self._expire(request, self.sizer.likely_cost(request.size) or 0.0)

    def _expire(self, request: _Request, cost: float = 0.0) -> None:
        """The deadline timer of a queued request, or its batch's cut finding it too late for a call of `cost` seconds
        and its answer's time after compute: out of the queue, answered DeadlineExceeded, never computed. Counted
        'deadline', or 'send' when the call alone would have ended in time."""
        request.timer = None
        if not request.queued:
            return
        self._unqueue(request)
        now = time.perf_counter()
        left = request.deadline - now
        reason = "deadline"
        if left <= 0:
            message = self._expired(request.deadline)
        elif cost >= left:
            message = (
                f"{self._who()}: the request's deadline is {left * 1000:.0f} ms away, but its call would likely take "
                f"{cost * 1000:.0f} ms (a high quantile of recent calls of its size; {self._waiting} waiting): dropped "
                "before compute rather than answered late. Give it a longer deadline (gRPC timeout, or the 'timeout' "
                "parameter in microseconds), or send less load"
            )
        else:
            reason = "send"
            message = (
                f"{self._who()}: the request's deadline is {left * 1000:.0f} ms away; its call would likely take "
                f"{cost * 1000:.0f} ms, but this variant's answers take up to {self.answer_time.high(now) * 1000:.0f} ms "
                f"after compute to leave the server (a high quantile of recent ones; {self._waiting} waiting): dropped "
                "before compute rather than answered late. Give it a longer deadline (gRPC timeout, or the 'timeout' "
                "parameter in microseconds), or send less load"
            )
        if not request.future.done():
            request.future.set_exception(DeadlineExceeded(message))
        self._dropped(reason)
        self._wakeup.set()

    def _late_answer(self, deadline: float, started: float, compute: float) -> str | None:
        """Why a computed answer is not sent (None: it is in time): its deadline passed while its call ran (the call took
        longer than its likely cost: a stall, a noisy neighbour) or before the answer got back to the event loop."""
        now = time.perf_counter()
        if now < deadline:
            return None
        return (
            f"{self._who()}: the request was computed, but its answer was ready {(now - deadline) * 1000:.0f} ms after its "
            f"deadline (its call took {compute * 1000:.0f} ms and ended {(started + compute - deadline) * 1000:+.0f} ms from "
            "the deadline); it is answered DEADLINE_EXCEEDED rather than late, as its caller no longer waits for it. Give it "
            "a longer deadline (gRPC timeout, or the 'timeout' parameter in microseconds), or send less load"
        )

    def check_in_time(self, deadline: float, ended: float | None = None) -> None:
        """For the caller of `submit`, once it resumed with its answer: DeadlineExceeded (counted 'late') when the deadline
        passed meanwhile (the answer was ready in time, but the event loop came back to its caller late), so that the
        answer is not encoded and sent after it. `ended`: when its call ended (perf_counter); an answer stopped here is
        still a sample of `answer_time` (at least this long after compute), so that a busy loop is not left out of it."""
        now = time.perf_counter()
        late = now - deadline
        if late >= 0:
            if ended is not None:
                self.answer_time.add(now - ended, now)
            self._dropped("late")
            raise DeadlineExceeded(
                f"{self._who()}: the request was computed in time, but its answer came back to it {late * 1000:.0f} ms "
                "after its deadline (the server was busy); it is answered DEADLINE_EXCEEDED rather than late. Give it a "
                "longer deadline (gRPC timeout, or the 'timeout' parameter in microseconds), or send less load"
            )

    def _check_answer_in_time(self, deadline: float | None, started: float, compute: float) -> None:
        """An unbatched or inline call's answer: DeadlineExceeded (counted 'late') when it is ready after the deadline."""
        if deadline is not None and (message := self._late_answer(deadline, started, compute)) is not None:
            self._dropped("late")
            raise DeadlineExceeded(message)

    def _dropped(self, reason: str) -> None:
        if self.on_drop is None:
            return
        try:
            self.on_drop(reason)
        except Exception:  # metrics must never fail inference
            log.exception("on_drop observer of %s failed", self._who())

    def _unqueue(self, request: _Request) -> None:
        if request.timer is not None:
            request.timer.cancel()
            request.timer = None
        request.queued = False
        queue = self._queues[request.key]
        queue.remove(request)
        self._samples[request.key] -= request.size
        self._waiting -= 1
        if not queue:
            del self._queues[request.key]
            del self._samples[request.key]

    async def _dispatch_loop(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                wait = self._start_due_batches()
                if self._closing and not self._waiting and not self._inflight:
                    return
                if wait is not None:
                    self._timer = asyncio.get_running_loop().call_later(wait, self._wakeup.set)
                await self._wakeup.wait()
        except BaseException as e:  # a bug, or the loop closing: callers must not hang
            self._dispatcher = None
            if not isinstance(e, asyncio.CancelledError):
                log.exception("batcher of %s stopped", self._who())
            for queue in list(self._queues.values()):
                for request in list(queue):
                    self._unqueue(request)
                    if not request.future.done():
                        request.future.set_exception(Unavailable(f"{self._who()}: batcher stopped: {e!r}"))
            raise

    def _start_due_batches(self) -> float | None:
        """Starts every call that is due now; returns seconds until the next one falls due (None: none)."""
        cfg = self.config
        while self._waiting and self._inflight < self.max_concurrency:
            key = min(self._queues, key=lambda k: self._queues[k][0].enqueued) if len(self._queues) > 1 else next(iter(self._queues))
            queue = self._queues[key]
            available = self._samples[key]
            waited = time.perf_counter() - queue[0].enqueued
            cap = min(available, cfg.max_batch_size)
            preferred = [p for p in cfg.preferred_batch_sizes if p <= cap]
            if preferred:
                cap = preferred[-1]  # the largest preferred size the waiting samples fill
            else:
                sizer = self.sizer
                if not (self._inflight == 0 or self._closing or waited >= self._delay) and sizer.worth_waiting(available):
                    return self._delay - waited  # a measured larger batch is cheaper per sample: worth a short wait
                cap = sizer.cut(cap)
                free = self.max_concurrency - self._inflight
                if free > 1 and not sizer.pays(cap):
                    cap = -(-cap // free)  # merging gains nothing here: spread what waits over the free call slots
            self._start(key, queue, cap)
        return None

    def _start(self, key: Hashable, queue: deque[_Request], cap: int) -> None:
        now = time.perf_counter()
        # A request whose deadline passed (its timer has not fired yet), or that even a call of its own size (at its
        # likely cost) would answer after it: dropped before compute.
        while queue and (cost := self._late_by(queue[0], now, queue[0].size)) is not None:
            self._expire(queue[0], cost)
        if not queue:
            return
        batch = [queue.popleft()]  # the head goes even when it alone exceeds the cap: it runs unsplit
        total = batch[0].size
        earliest = batch[0].deadline
        while queue and total + queue[0].size <= cap:
            if (cost := self._late_by(queue[0], now, queue[0].size)) is not None:
                self._expire(queue[0], cost)
                continue
            if not self._fits(earliest, queue[0], now, total + queue[0].size):
                break  # a larger call would likely end past a deadline of the batch: cut here, the rest go next
            request = queue.popleft()
            if request.deadline is not None:
                earliest = request.deadline if earliest is None else min(earliest, request.deadline)
            batch.append(request)
            total += request.size
        for request in batch:
            request.queued = False
            if request.timer is not None:
                request.timer.cancel()
                request.timer = None
        self._waiting -= len(batch)
        if queue:
            self._samples[key] -= total
        else:  # (an expiry above may have removed the emptied queue already)
            self._queues.pop(key, None)
            self._samples.pop(key, None)
        self._inflight += 1
        self._calls[id(batch)] = (now, total)
        if self._runs_inline():
            self._answer(self._run_batch(batch, total), batch, total)
            return
        loop = asyncio.get_running_loop()
        try:
            future = self.executor.submit(self._run_batch, batch, total)
        except RuntimeError as e:  # the compute pool is shut down
            self._inflight -= 1
            self._calls.pop(id(batch), None)
            error = Unavailable(f"{self._who()}: cannot run: {e}")
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        # Straight back to the loop from the worker: one wake-up per batch, no asyncio future in between.
        future.add_done_callback(lambda f: self._hand_back(loop, f, batch, total))

    def _hand_back(self, loop: asyncio.AbstractEventLoop, future: concurrent.futures.Future, batch: list[_Request], total: int) -> None:
        try:
            loop.call_soon_threadsafe(self._finish, future, batch, total)
        except RuntimeError:  # the event loop is closed: nobody is left to answer
            pass

    def _finish(self, future: concurrent.futures.Future, batch: list[_Request], total: int) -> None:
        """A batch back from the compute pool."""
        try:
            outcome = future.result()
        except concurrent.futures.CancelledError:  # the compute pool shut down before the call ran
            outcome = (None, None, None, Unavailable(f"{self._who()}: the compute pool shut down before the call ran"))
        except BaseException as e:  # not an Exception (those come back as values): still answer everyone
            outcome = (None, None, None, e)
        self._answer(outcome, batch, total)

    def _answer(self, outcome: tuple, batch: list[_Request], total: int) -> None:
        """Answers a batch's callers from `_run_batch`'s (results, started, compute, error); started is None when it never ran."""
        self._inflight -= 1
        self._calls.pop(id(batch), None)
        results, started, compute, error = outcome
        if error is not None:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
        else:
            for request, result in zip(batch, results):
                if not request.future.done():  # done: cancelled while its batch ran; the answer is discarded
                    late = None if request.deadline is None else self._late_answer(request.deadline, started, compute)
                    if late is None:
                        request.future.set_result(result)
                    else:
                        request.future.set_exception(DeadlineExceeded(late))
                        self._dropped("late")
                if request.timing is not None:
                    request.timing.append((started, compute, total))
        # Poked after the answers: the next batch starts after their callers had a chance to send again.
        self._poke(asyncio.get_running_loop())
        if started is not None:
            self._record_compute(compute)
            self._observe(total, [started - r.enqueued for r in batch], compute)

    def _observe(self, size: int, queue_seconds: list[float], compute: float) -> None:
        self.sizer.observe(size, compute)
        if self.on_batch is None:
            return
        try:
            self.on_batch(size, queue_seconds, compute)
        except Exception:  # metrics must never fail inference
            log.exception("on_batch observer of %s failed", self._who())

    # ------------------------------------------------------------------ batching on: the worker side

    def _run_batch(
        self, batch: list[_Request], total: int
    ) -> tuple[list[dict[str, np.ndarray]] | None, float, float, BaseException | None]:
        """Merges, computes and splits one batch on a worker thread; errors come back as values."""
        started = time.perf_counter()
        try:
            first = batch[0]
            if len(batch) == 1:
                return [self.predict(first.inputs, first.outputs)], started, time.perf_counter() - started, None
            merged = {name: np.concatenate([r.inputs[name] for r in batch], axis=0) for name in first.inputs}
            result = self.predict(merged, first.outputs)
            compute = time.perf_counter() - started
            return split_outputs(result, [r.size for r in batch], total), started, compute, None
        except Exception as e:
            return None, started, time.perf_counter() - started, e
