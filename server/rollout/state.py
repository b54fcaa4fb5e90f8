"""A rollout's record: its state, stage, plan, the traffic it started from, gate results and history, kept in the manifest.

`RolloutState` is JSON-plain on disk under the model manifest's "rollout" key (server/store/manifest.py), so
a restart finds a running rollout at its stage and `rollout status` finds a finished one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from slimserve.server.errors import FailedPrecondition
from slimserve.server.rollout.plan import RolloutPlan
from slimserve.server.store.repository import Repository
from slimserve.server.store.traffic import TrafficPolicy

STATE_VERSION = 1
ACTIVE = ("shadow", "canary")
TERMINAL = ("promoted", "rolled_back", "aborted")


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class GateResult:
    """A gate's latest answer at the current stage (see server/rollout/sequential.Verdict)."""

    name: str
    decision: str
    statistic: float | None
    threshold: float
    evidence: str


@dataclass
class Event:
    """One line of a rollout's history."""

    time: float
    kind: str  # started | stage | resumed | rolled_back | promoted | aborted
    state: str
    weight: float
    message: str
    gate: str = ""
    statistic: float | None = None
    threshold: float | None = None
    evidence: str = ""


@dataclass
class RolloutState:
    """What `rollout status` shows; `stage` indexes `plan.stages()`."""

    model: str
    variant: str
    control: str
    plan: RolloutPlan
    original: TrafficPolicy
    state: str = "shadow"
    stage: int = 0
    weight: float = 0.0
    started_at: float = 0.0
    stage_started_at: float = 0.0
    finished_at: float | None = None
    reason: str = ""
    requests: dict[str, int] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    history: list[Event] = field(default_factory=list)
    source: str = "process"  # whose statistics the gates read: this process's own

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "model": self.model,
            "variant": self.variant,
            "control": self.control,
            "plan": self.plan.to_dict(),
            "original": self.original.to_dict(),
            "state": self.state,
            "stage": self.stage,
            "weight": self.weight,
            "started_at": self.started_at,
            "stage_started_at": self.stage_started_at,
            "finished_at": self.finished_at,
            "reason": self.reason,
            "requests": dict(self.requests),
            "gates": [asdict(g) for g in self.gates],
            "history": [asdict(e) for e in self.history],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutState:
        if d.get("version") != STATE_VERSION:
            raise FailedPrecondition(f"rollout record has version {d.get('version')}, expected {STATE_VERSION}")
        plan = dict(d["plan"])
        return cls(
            model=d["model"],
            variant=d["variant"],
            control=d["control"],
            plan=RolloutPlan(**{**plan, "steps": tuple(plan["steps"])}),
            original=TrafficPolicy.from_dict(d["original"]),
            state=d["state"],
            stage=int(d["stage"]),
            weight=float(d["weight"]),
            started_at=float(d["started_at"]),
            stage_started_at=float(d["stage_started_at"]),
            finished_at=d.get("finished_at"),
            reason=d.get("reason", ""),
            requests=dict(d.get("requests", {})),
            gates=[GateResult(**g) for g in d.get("gates", [])],
            history=[Event(**e) for e in d.get("history", [])],
            source=d.get("source", "process"),
        )

    def record(self) -> dict[str, Any]:
        """The `rollout status --json` record of shared/DESIGN.md (times as ISO 8601, UTC)."""
        return {
            "model": self.model,
            "state": self.state,
            "variant": self.variant,
            "control": self.control,
            "weight": self.weight,
            "stage": self.plan.stages()[min(self.stage, len(self.plan.stages()) - 1)][0] if self.active else None,
            "requests": dict(self.requests),
            "gates": [asdict(g) for g in self.gates],
            "history": [{**asdict(e), "time": iso(e.time)} for e in self.history],
            "reason": self.reason,
            "source": self.source,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at) if self.finished_at is not None else None,
            "plan": self.plan.to_dict(),
        }


def load(repository: Repository, model: str) -> RolloutState | None:
    """The model's rollout on record, running or finished; None when it never had one."""
    record = repository.get(model).rollout
    return RolloutState.from_dict(record) if record else None


def save(repository: Repository, state: RolloutState) -> None:
    """Writes the rollout into its model's manifest (atomically, with everything else the manifest holds)."""
    record = state.to_dict()

    def put(info: Any) -> None:
        info.rollout = record

    repository.update(state.model, put)
