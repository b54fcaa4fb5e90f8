"""The A/B baseline of `bench_slo --server`: `slimserve start` with this tree's code, but round 3's deadline changes (issue
24) taken out, in this process only:

- no reserve for the answers' time after compute: `answer_left` records nothing, so `answer_time` stays empty and every
  deadline check reserves 0 s for handing back, encoding and sending (as before);
- a queued request's timer at its deadline, not at the last moment its call could start;
- `predicted_wait` (what the SLO loop reads) at the cheapest measured cost per sample (`BatchSizer.least_wait`);
- a full queue's RESOURCE_EXHAUSTED not counted as shed (no 'full' drop).

    python -m bench.slo_baseline_server start --repository ... (the arguments of `slimserve start`)

With SLO_RESERVE_QUANTILE=Q in its environment it takes nothing out and only reserves the Q quantile of the answers'
time after compute instead of the 95th percentile (`bench_slo --server --reserve-quantiles Q`).

bench/slo_server.py starts it in place of `python -m slimserve.server.cli` (`start_server(..., baseline=True)`).
"""

from __future__ import annotations

from slimserve.server.batching.batcher import DynamicBatcher

_dropped = DynamicBatcher._dropped
RESERVE_QUANTILE = "SLO_RESERVE_QUANTILE"  # set: only the reserve's quantile changes (nothing taken out)


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


def reserve_at(quantile: float) -> None:
    """Patches the batcher class of this process to reserve `quantile` of its answers' time after compute (instead of the
    default 95th percentile): the A/B of the reserve's quantile (`bench_slo --server --reserve-quantiles`)."""
    init = DynamicBatcher.__init__

    def __init__(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.answer_time.quantile = quantile

    DynamicBatcher.__init__ = __init__


if __name__ == "__main__":
    import os

    quantile = os.environ.get(RESERVE_QUANTILE)
    if quantile:
        reserve_at(float(quantile))
    else:
        take_out()
    from slimserve.server.cli import main

    main()
