"""Fine-tuning held to an accuracy budget: the guard a budget search sets around a pass, and the extra epochs it allows.

slimserve.optimizer.search.budget sets a guard (`guarding`) around a pass it holds to a budget; slimserve.optimizer.finetune.loop's loop reads it
(`current_guard`) after its configured epochs and goes on while the model is over the budget and each extra epoch
lowers its drop, within the guard's epochs and seconds. A context variable carries it, so that every training pass
(pruning, distillation, QAT) continues without the budget being threaded through each pass's code.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import numpy as np

from slimserve.optimizer.base import PassContext, ProgressEvent


class QualityGuard(Protocol):
    """A budget the model is held to while it trains (slimserve.optimizer.search.budget.Guard): its drop in points, and how long to go on."""

    budget: float
    extra_epochs: int
    extra_seconds: float

    def drop(self, model: Any, dtypes: list[np.dtype]) -> float | None: ...


# The guard of the pass running on this thread: set by the budget search around a pass, read by `fine_tune_`, so that every
# training pass continues while over the budget without threading the budget through each pass's code.
_guard: ContextVar[QualityGuard | None] = ContextVar("finetune_budget_guard", default=None)
# The LR of the epochs that continue after the schedule ended, as a share of the configured peak.
EXTRA_LR_FACTOR = 0.3


def current_guard() -> QualityGuard | None:
    return _guard.get()


@contextlib.contextmanager
def guarding(guard: QualityGuard | None) -> Iterator[None]:
    """Within the block, `fine_tune_` continues (after its epochs) while `guard` says the model is over its budget and improving."""
    token = _guard.set(guard)
    try:
        yield
    finally:
        _guard.reset(token)


def continue_while_over_budget(
    model: Any,
    extra_params: Sequence[Any],
    guard: QualityGuard,
    dtypes: list[np.dtype],
    context: PassContext,
    stage: str,
    done: int,
    run_epoch: Callable[[int, int, bool], Any],
) -> list[Any]:
    """Extra epochs while the model is over the budget and each epoch lowers its drop, within the guard's epochs and seconds; keeps the best."""
    drop = guard.drop(model, dtypes)
    if drop is None or drop <= guard.budget:
        return []
    best = (drop, copy.deepcopy(model.state_dict()), [p.detach().clone() for p in extra_params])
    deadline = time.monotonic() + guard.extra_seconds
    results: list[Any] = []
    reason = f"{guard.extra_epochs} extra epoch(s) done"
    for k in range(guard.extra_epochs):
        if time.monotonic() > deadline:
            reason = f"the {guard.extra_seconds:g} s limit was reached"
            break
        results.append(run_epoch(done + k, done + guard.extra_epochs, False))
        drop = guard.drop(model, dtypes)
        if drop is None:
            break
        context.progress(
            ProgressEvent(
                stage=stage, fraction=1.0, message=f"over the budget: extra epoch {k + 1}: loses {drop:.2f} pt (budget {guard.budget:g})"
            )
        )
        if drop >= best[0] - 1e-6:
            reason = f"extra epoch {k + 1} did not improve ({drop:.2f} pt against {best[0]:.2f})"
            break
        best = (drop, copy.deepcopy(model.state_dict()), [p.detach().clone() for p in extra_params])
        if drop <= guard.budget:
            reason = f"within the budget after {k + 1} extra epoch(s)"
            break
    if drop is None or drop > best[0]:
        model.load_state_dict(best[1])
        for p, saved in zip(extra_params, best[2]):
            p.data.copy_(saved)
    context.progress(ProgressEvent(stage=stage, fraction=1.0, message=f"fine-tuning stopped: {reason}; kept {best[0]:.2f} pt"))
    return results
