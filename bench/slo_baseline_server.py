"""The A/B baseline of `bench_slo --server`: `slimserve start` with this tree's code, but round 3's deadline changes (issue
24) taken out, in this process only:

- no reserve for the answers' time after compute: `answer_left` records nothing, so `answer_time` stays empty and every
  deadline check reserves 0 s for handing back, encoding and sending (as before);
- a queued request's timer at its deadline, not at the last moment its call could start;
- `predicted_wait` (what the SLO loop reads) at the cheapest measured cost per sample (`BatchSizer.least_wait`);
- a full queue's RESOURCE_EXHAUSTED not counted as shed (no 'full' drop).

    python -m bench.slo_baseline_server start --repository ... (the arguments of `slimserve start`)

bench/slo_server.py starts it in place of `python -m slimserve.server.cli` (`start_server(..., baseline=True)`).
"""

from __future__ import annotations

from slimserve.server.batching.batcher import DynamicBatcher

_dropped = DynamicBatcher._dropped


def _no_answer_time(self: DynamicBatcher, ended: float, *_: object) -> None:
    return None


def _timer_at_deadline(self: DynamicBatcher, request, now: float) -> float:
    return request.deadline


def _least_wait(self: DynamicBatcher) -> float | None:
    return self.sizer.least_wait(sum(self._samples.values()), self.max_concurrency)


def _not_full(self: DynamicBatcher, reason: str) -> None:
    if reason != "full":
        _dropped(self, reason)


def take_out() -> None:
    """Patches the batcher class of this process back to round 2's deadline handling."""
    DynamicBatcher.answer_left = _no_answer_time
    DynamicBatcher._last_start = _timer_at_deadline
    DynamicBatcher.predicted_wait = _least_wait
    DynamicBatcher._dropped = _not_full


if __name__ == "__main__":
    take_out()
    from slimserve.server.cli import main

    main()
