"""What the gates read and how they answer: per-arm counters since a stage began, and one verdict per gate.

`Arm` is one variant's counters at one moment; `ArmStatistics` is the small interface the controller
reads them through (`ProcessStatistics` reads this process's VariantStats and FeedbackStore; tests pass
fakes). A stage takes a snapshot when it starts and judges the difference, so earlier traffic never counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import partial
from typing import Protocol

import numpy as np

from slimserve.server.errors import NotFound
from slimserve.server.rollout.plan import RolloutPlan
from slimserve.server.rollout.sequential import (
    Verdict,
    costlier,
    noninferior_proportion,
    noninferior_quantile,
    noninferior_rate,
    rate_at_least,
    slower_quantile,
    worse_rate,
)
from slimserve.server.rollout.state import GateResult


@dataclass(frozen=True)
class Arm:
    """One variant's counters (totals since it loaded): requests answered or failed, the latency window's mark,
    device seconds, feedback (correct of labelled), as a shadow, top-1 agreement (agreed of mirrored), and the requests
    its queue shed (refused on arrival, for their deadline or a full queue, or dropped at their deadline: also counted in
    errors)."""

    requests: int = 0
    errors: int = 0
    latency_mark: int = 0
    device_seconds: float = 0.0
    correct: int = 0
    labelled: int = 0
    agreed: int = 0
    mirrored: int = 0
    shed: int = 0  # refused (deadline, queue full) or dropped at their deadline, never computed (the SLO's breach beyond the p99)

    def __sub__(self, start: Arm) -> Arm:
        return Arm(**{f.name: getattr(self, f.name) - getattr(start, f.name) for f in fields(Arm)})

    def went_back(self) -> bool:
        """A counter below the stage's snapshot: the variant was reloaded and its statistics began again."""
        return any(getattr(self, f.name) < 0 for f in fields(Arm))


class ArmStatistics(Protocol):
    """`refresh` once per look (it may wait on I/O), then `arm` and `latencies_since` read what it found;
    `source` says whose traffic that is, for `rollout status`."""

    source: str

    async def refresh(self, model: str, variants: Iterable[str]) -> None: ...

    def arm(self, model: str, variant: str) -> Arm: ...

    def latencies_since(self, model: str, variant: str, mark: int) -> np.ndarray: ...


class ProcessStatistics:
    """The statistics this process keeps of its loaded variants (server/telemetry/statistics.py), read through the DataPlane."""

    source = "process (this server's own traffic)"

    def __init__(self, dataplane) -> None:
        self.dataplane = dataplane

    async def refresh(self, model: str, variants: Iterable[str]) -> None:
        """Nothing to fetch: the counters are in memory."""

    def _served(self, model: str, variant: str):
        loaded = self.dataplane.loaded_model(model)
        served = loaded.variants.get(variant)
        if served is None:
            raise NotFound(f"variant '{variant}' of model '{model}' is not loaded")
        return loaded, served

    def arm(self, model: str, variant: str) -> Arm:
        loaded, served = self._served(model, variant)
        stats = served.stats
        correct, labelled = loaded.feedback.online_counts(variant)
        agreed, mirrored = loaded.feedback.agreement_counts(variant)
        return Arm(stats.requests, stats.errors, stats.window.total, stats.device_seconds, correct, labelled, agreed, mirrored, stats.shed)

    def latencies_since(self, model: str, variant: str, mark: int) -> np.ndarray:
        return self._served(model, variant)[1].stats.window.since(mark)


def judge(
    plan: RolloutPlan, stage: str, canary: Arm, control: Arm, canary_latency: np.ndarray, control_latency: np.ndarray
) -> list[GateResult]:
    """Every gate of the stage on the counts since it began, by the non-inferiority SPRTs (sequential.rate_sprt,
    noninferior_proportion, noninferior_quantile: the null is "worse by the margin"); a fail at the plan's alpha per
    test (RolloutPlan.alpha_per_test), a pass at its alpha_to_pass."""
    a = plan.alpha_to_pass()
    return _judge(
        plan,
        stage,
        canary,
        control,
        canary_latency,
        control_latency,
        partial(noninferior_rate, alpha_pass=a),
        partial(noninferior_proportion, alpha_pass=a),
        partial(noninferior_quantile, alpha_pass=a),
    )


def judge_mixture(
    plan: RolloutPlan, stage: str, canary: Arm, control: Arm, canary_latency: np.ndarray, control_latency: np.ndarray
) -> list[GateResult]:
    """judge with the two-sided beta-binomial mixture confidence sequences instead of the SPRTs (the gates before
    issue 24; bench/bench_rollout.py compares the two)."""
    return _judge(plan, stage, canary, control, canary_latency, control_latency, worse_rate, rate_at_least, slower_quantile)


def _judge(plan, stage, canary, control, canary_latency, control_latency, rate, proportion, quantile) -> list[GateResult]:
    alpha = plan.alpha_per_test()
    out = []
    for name in plan.gates_of(stage):
        value = plan.gates[name]
        if name == "error":
            verdict = rate((canary.errors, canary.requests), (control.errors, control.requests), value, alpha)
        elif name == "agreement":
            verdict = proportion(canary.agreed, canary.mirrored, value, alpha, "top-1 agreement with the control")
        elif name in ("latency_p50", "latency_p99"):
            q = 0.5 if name == "latency_p50" else 0.99
            verdict = quantile(canary_latency, control_latency, q, value, alpha)
        elif name == "accuracy":
            if canary.labelled == 0 and control.labelled == 0:
                verdict = Verdict("skip", None, value, "no feedback in this stage: accuracy is not gated until labels arrive")
            else:
                wrong = ((canary.labelled - canary.correct, canary.labelled), (control.labelled - control.correct, control.labelled))
                verdict = rate(*wrong, value, alpha, "error rate on labelled requests (1 - accuracy)")
        else:  # cost
            verdict = costlier((canary.device_seconds, canary.requests), (control.device_seconds, control.requests), value)
        out.append(GateResult(name, verdict.decision, verdict.statistic, verdict.threshold, verdict.evidence))
    return out
