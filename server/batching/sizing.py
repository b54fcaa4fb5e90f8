"""How large a batch pays on one variant: an online estimate of compute seconds per sample at each batch size (from
the call times the batcher already measures), and the two decisions it gives the batcher: where to cut a batch, and
whether waiting for more requests is worth it.

On a CPU, merging requests pays only when a batch of n costs less than n calls of one: a tiny model
spends most of a call on fixed overhead (the digits CNN: batch 32 costs 7x batch 1), a transformer
encoder at sequence length 128 does not (MiniLM-L6: batch 16 costs more per sample than batch 1, its
matrices leave the cache). Sizes are grouped in powers of two (1, 2-3, 4-7, ...); each group keeps a
moving average of seconds per sample.

- `cut(available)`: the most samples to take now. A group whose cost per sample is within `tolerance`
  of the best measured is "good"; the cut is the largest good size the waiting samples fill, so a model
  whose cost grows faster than its batch runs small batches (and its second call slot, if any, the
  rest). A group not measured yet is tried only after the group below it measured good, so the
  estimate grows one step at a time and never pays for a huge batch on a guess; every
  `explore_every` batches the group just above the cut is tried again, so that an estimate made under
  a noisy neighbour is corrected. The first call takes what waits (nothing is known yet); if that was a
  long call (over `probe_above_s`) of many samples, the next one measures a single sample before the
  large size is trusted.
- `worth_waiting(available)`: True only when a measured larger group costs less per sample than the
  batch that could start now by more than `wait_gain` (waiting costs every waiting request latency, so
  it takes a clear gain, not noise). Without that evidence a free call slot starts at once: a model
  whose batch-8 call costs 8x its batch-1 call gains nothing from waiting.
- `typical_cost(size)` / `likely_cost(size)`: what a call of `size` samples costs on average (the moving average) and
  conservatively (the 95th percentile of the group's recent calls): the batcher's deadline checks take the work ahead
  of a request at its typical cost and the request's own call at its likely cost, so that a request is refused or
  dropped before compute rather than answered after its deadline when calls vary (a busy machine: 10-25 ms for one
  that usually takes 12).

`TailWindow` is the same kind of estimate for the time after compute: from a call's end until its answer has left the
server (handed back to the event loop, resumed, encoded, sent), a high quantile of the recent answers of requests with a
deadline; the batcher reserves it before the deadline, so that an answer that would be computed in time but leave late
is refused or dropped before compute.
"""

from __future__ import annotations

import time
from collections import deque

GROUPS = 12  # 1 .. 4095 samples
COST_WINDOW = 100  # recent calls per group whose cost per sample `likely_cost` takes a quantile of
# how high: in bench_slo, 0.99 let fewer answers be late on MiniLM but shed 1.8x more than the old checks on the digits CNN
COST_QUANTILE = 0.95
COST_MIN_CALLS = 10  # recent calls a group needs before its quantile is trusted
COST_AGE_S = 5.0  # calls older than this leave the window: a stall, or a slow first call, is forgotten even if every
# request since was dropped for it (no call ran to replace it)


ANSWER_WINDOW = 100  # recent answers whose time after compute `TailWindow.high` takes a quantile of
ANSWER_REFRESH = 8  # new answers after which the quantile is computed again (a sort of ANSWER_WINDOW floats): not per request


def group_of(size: int) -> int:
    """The power-of-two group of a batch size: 1 -> 0, 2-3 -> 1, 4-7 -> 2, ..."""
    return min(max(size, 1).bit_length() - 1, GROUPS - 1)


def top_of(group: int) -> int:
    """The largest batch size in a group."""
    return (2 << group) - 1


class BatchSizer:
    """Online cost per sample by batch-size group, and the cut / wait decisions of the batcher (loop thread only)."""

    def __init__(
        self,
        max_batch_size: int,
        tolerance: float = 0.05,
        wait_gain: float = 0.25,
        smoothing: float = 0.25,
        explore_every: int = 200,
        probe_above_s: float = 0.005,
        cost_quantile: float = COST_QUANTILE,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.probe_above_s = probe_above_s
        self.tolerance = tolerance
        self.wait_gain = wait_gain
        self.smoothing = smoothing
        self.explore_every = explore_every
        self.per_sample: list[float | None] = [None] * GROUPS  # seconds per sample, a moving average
        self.observed = [0] * GROUPS
        self._batches = 0
        self.cost_quantile = cost_quantile
        # per group: (perf_counter when observed, seconds per sample) of the recent calls
        self._recent: list[deque[tuple[float, float]]] = [deque(maxlen=COST_WINDOW) for _ in range(GROUPS)]
        self._high: list[float | None] = [None] * GROUPS  # the quantile of _recent, computed when asked after a change

    def observe(self, size: int, compute_s: float) -> None:
        """One executed call of `size` samples that computed for `compute_s` seconds."""
        if size < 1 or compute_s <= 0:
            return
        g = group_of(size)
        cost = compute_s / size
        old = self.per_sample[g]
        self.per_sample[g] = cost if old is None else old + self.smoothing * (cost - old)
        self.observed[g] += 1
        self._recent[g].append((time.perf_counter(), cost))
        self._high[g] = None
        self._batches += 1

    def _best(self) -> float | None:
        known = [c for c in self.per_sample if c is not None]
        return min(known) if known else None

    def _good(self, group: int, best: float) -> bool:
        cost = self.per_sample[group]
        return cost is not None and cost <= best * (1.0 + self.tolerance)

    def _tryable(self, group: int, best: float) -> bool:
        """Not measured yet, and the group below measured and still getting cheaper (or as cheap): one step up."""
        if self.per_sample[group] is not None:
            return False
        if group == 0:
            return True
        below = self.per_sample[group - 1]
        if below is None:
            return False
        cheapest_under = min((c for c in self.per_sample[: group - 1] if c is not None), default=below)
        return below <= cheapest_under * (1.0 + self.tolerance)

    def cut(self, available: int) -> int:
        """How many of `available` waiting samples the next call takes (at least 1, at most max_batch_size)."""
        want = max(1, min(available, self.max_batch_size))
        best = self._best()
        if best is None:
            return want  # nothing measured yet: the first call takes what waits, as a batcher without an estimate does
        if self.per_sample[0] is None:
            known = min(g for g, c in enumerate(self.per_sample) if c is not None)
            if self.per_sample[known] * (1 << known) >= self.probe_above_s:
                return 1  # a long call measured at a large size only: measure one sample before trusting it
        size = want
        while size > 1 and not (self._good(group_of(size), best) or self._tryable(group_of(size), best)):
            size = min(size, top_of(group_of(size) - 1))
        if size == 1 and not self._good(0, best):
            # Even one sample costs more than the best larger group: no good size fits what waits, so take it all.
            return want
        if size < want and self.explore_every > 0 and self._batches % self.explore_every == self.explore_every - 1:
            size = min(want, top_of(group_of(size) + 1))  # now and then one step above the cut: the estimate may be stale
        return size

    def pays(self, size: int) -> bool:
        """Whether merging `size` samples was measured cheaper per sample than single calls (True without evidence)."""
        one, many = self.per_sample[0], self.per_sample[group_of(size)]
        return size <= 1 or one is None or many is None or many < one * (1.0 - self.tolerance)

    def worth_waiting(self, available: int) -> bool:
        """Whether a measured larger batch is cheaper per sample than the `available` samples by more than the tolerance."""
        if available >= self.max_batch_size:
            return False
        g = group_of(available)
        now = self.per_sample[g]
        if now is None:
            now = next((self.per_sample[j] for j in range(g - 1, -1, -1) if self.per_sample[j] is not None), None)
        if now is None:
            return False
        larger = [c for c in self.per_sample[g + 1 : group_of(self.max_batch_size) + 1] if c is not None]
        return bool(larger) and min(larger) < now * (1.0 - self.wait_gain)

    def least_wait(self, samples: int, concurrency: int) -> float | None:
        """The least time `samples` waiting samples can take to compute on `concurrency` call slots, at the cheapest
        measured cost per sample (None: nothing measured). A lower bound: a request predicted later than its deadline
        by it will be late whatever the batches turn out to be."""
        best = self._best()
        if best is None:
            return None
        return samples * best / max(concurrency, 1)

    def likely_cost(self, size: int) -> float | None:
        """Seconds a call of `size` samples may take, conservatively: `cost_quantile` of the cost per sample of its
        group's recent calls (the last COST_WINDOW, none older than COST_AGE_S; by default the 95th percentile: one call
        in twenty costs more), times `size`. A group with fewer than COST_MIN_CALLS such calls takes the highest quantile of the groups that
        have them; with none, the cheapest recent cost per sample (a lower bound, as before any quantile is known).
        None: no call in the last COST_AGE_S. The batcher refuses, or drops before compute, a request whose call would
        end after its deadline at this cost; since old calls age out, a slow first call (or a stall) that made it drop
        every request, so that no call ran since, is forgotten after COST_AGE_S."""
        now = time.perf_counter()
        high = self._high_cost(group_of(size), now)
        if high is None:
            known = [h for h in (self._high_cost(g, now) for g in range(GROUPS) if self._recent[g]) if h is not None]
            if known:
                high = max(known)
            else:
                high = min((cost for g in range(GROUPS) for _, cost in self._recent[g]), default=None)
                if high is None:
                    return None
        return size * high

    def _high_cost(self, group: int, now: float) -> float | None:
        recent = self._recent[group]
        while recent and recent[0][0] < now - COST_AGE_S:
            recent.popleft()
            self._high[group] = None
        if len(recent) < COST_MIN_CALLS:
            return None
        if self._high[group] is None:  # computed once per new call (and per call aged out), not per request
            ordered = sorted(cost for _, cost in recent)
            self._high[group] = ordered[min(int(self.cost_quantile * len(ordered)), len(ordered) - 1)]
        return self._high[group]

    def typical_cost(self, size: int) -> float | None:
        """Seconds a call of `size` samples takes on average: the moving average of its group's cost per sample (the
        cheapest measured group's while its own is not measured) times `size`. None: nothing measured."""
        cost = self.per_sample[group_of(size)]
        if cost is None:
            cost = self._best()
        return None if cost is None else size * cost

    def snapshot(self) -> dict[int, float]:
        """Measured microseconds per sample by the smallest size of each group (for benchmarks and logs)."""
        return {1 << g: c * 1e6 for g, c in enumerate(self.per_sample) if c is not None}


class TailWindow:
    """A high quantile of recent durations (seconds), each kept COST_AGE_S at most: the batcher's measure of the time its
    answers take after compute (from a call's end until the answer left the server), fed by the transports through the
    dataplane for requests with a deadline. Loop thread only."""

    __slots__ = ("_high", "_new", "_recent", "age_s", "min_samples", "quantile")

    def __init__(
        self, quantile: float = COST_QUANTILE, window: int = ANSWER_WINDOW, min_samples: int = COST_MIN_CALLS, age_s: float = COST_AGE_S
    ) -> None:
        self.quantile = quantile
        self.min_samples = min_samples
        self.age_s = age_s
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)  # (perf_counter when observed, seconds)
        self._high = 0.0
        self._new = ANSWER_REFRESH  # samples since the quantile was computed: compute it at the first ask

    def add(self, seconds: float, now: float | None = None) -> None:
        """One duration, observed now (perf_counter seconds)."""
        self._recent.append((time.perf_counter() if now is None else now, max(seconds, 0.0)))
        self._new += 1

    def high(self, now: float) -> float:
        """The `quantile` of the recent durations (those observed within `age_s` of `now`); 0.0 while fewer than
        `min_samples` are that recent: nothing is reserved on too little evidence, and a stall is forgotten after `age_s`.
        Computed again after ANSWER_REFRESH new samples or when one ages out."""
        recent = self._recent
        while recent and recent[0][0] < now - self.age_s:
            recent.popleft()
            self._new = ANSWER_REFRESH
        if len(recent) < self.min_samples:
            return 0.0
        if self._new >= ANSWER_REFRESH:
            ordered = sorted(seconds for _, seconds in recent)
            self._high = ordered[min(int(self.quantile * len(ordered)), len(ordered) - 1)]
            self._new = 0
        return self._high

    def __len__(self) -> int:
        return len(self._recent)
