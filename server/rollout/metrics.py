"""What a rollout shows Prometheus: its state and canary weight (gauges) and the gate decisions it acted on (a counter).

The families are rows of server/telemetry/metrics.py's table (ROLLOUT_FAMILIES); this module sets them from a
`RolloutState`, so the controller calls one method per change and never touches label values itself.
"""

from __future__ import annotations

from slimserve.server.rollout.state import RolloutState
from slimserve.server.telemetry.metrics import ROLLOUT_STATES, Metrics

DECISIONS = ("pass", "fail")


class RolloutMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def started(self, r: RolloutState) -> None:
        """Creates the rollout's decision counters at 0, so that the first fail is an increase Prometheus sees
        (a counter born at 1 has no earlier sample, and increase() over it says 0)."""
        labels = self.metrics.labels(r.model, r.variant)
        for gate in (*r.plan.gates, "time_limit"):
            for decision in DECISIONS:
                self.metrics.rollout_decisions.labels(**labels, gate=gate, decision=decision)
        self.show(r)

    def show(self, r: RolloutState) -> None:
        labels = self.metrics.labels(r.model, r.variant)
        for state in ROLLOUT_STATES:
            self.metrics.rollout_state.labels(**labels, state=state).set(1.0 if state == r.state else 0.0)
        weight = 1.0 if r.state == "promoted" else r.weight / 100.0 if r.state == "canary" else 0.0
        self.metrics.rollout_canary_weight.labels(**labels).set(weight)

    def decided(self, r: RolloutState, gates: list[str], decision: str) -> None:
        labels = self.metrics.labels(r.model, r.variant)
        for gate in gates:
            self.metrics.rollout_decisions.labels(**labels, gate=gate, decision=decision).inc()
