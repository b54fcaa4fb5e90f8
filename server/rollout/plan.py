"""A rollout's plan: its stages, gates and margins, the presets, and parsing from a JSON / YAML plan file or flags.

Pure domain code: a frozen, versioned `RolloutPlan` that checks itself, `plan_from_dict` / `to_dict`
for the manifest and plan files, and `alpha_per_test`, the one rule that splits the rollout's alpha.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from slimserve.server.errors import InvalidArgument

PLAN_VERSION = 1
# Gates and their one parameter: a margin (rates, in [0, 1]), a ratio (latency, cost: >= 1) or a minimum (agreement).
GATE_PARAMETERS = {
    "error": "margin",
    "latency_p50": "ratio",
    "latency_p99": "ratio",
    "accuracy": "margin",
    "agreement": "minimum",
    "cost": "ratio",
}
DEFAULT_GATES = {"error": 0.01, "latency_p50": 1.2, "latency_p99": 1.5, "accuracy": 0.01, "agreement": 0.95, "cost": 1.25}
SHADOW_GATES = ("agreement", "error")  # a shadow's latency is measured after its primary answered: not comparable
CANARY_GATES = ("error", "latency_p50", "latency_p99", "accuracy", "cost")
# Cost is a point check on summed device time (see sequential.costlier): it spends no alpha.
SEQUENTIAL = frozenset(GATE_PARAMETERS) - {"cost"}


@dataclass(frozen=True)
class RolloutPlan:
    """steps: canary weights in percent, increasing, each in (0, 100); promotion follows the last.
    shadow: start with a shadow stage (the variant mirrors every request, its answers compared).
    min_requests: requests the variant answers in a stage before it may pass it.
    max_stage_s: seconds a stage may take; a stage still undecided then rolls back (not shown as good).
    alpha: the chance, per rollout, of a wrong promotion and of a wrong rollback (each at most alpha).
    gates: gate name -> its parameter; a gate left out is off.
    """

    version: int = PLAN_VERSION
    steps: tuple[float, ...] = (5.0, 25.0, 50.0)
    shadow: bool = True
    min_requests: int = 500
    max_stage_s: float = 3600.0
    alpha: float = 0.05
    gates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GATES))

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(float(s) for s in self.steps))
        if self.version != PLAN_VERSION:
            raise InvalidArgument(f"rollout plan version {self.version} is not supported (expected {PLAN_VERSION})")
        if not self.steps:
            raise InvalidArgument("a rollout needs at least one canary step, e.g. steps 5,25,50")
        for step in self.steps:
            if not math.isfinite(step) or not 0 < step < 100:
                raise InvalidArgument(f"canary step {step:g} is out of range: each step is a percent in (0, 100)")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise InvalidArgument(f"canary steps must increase, got {','.join(f'{s:g}' for s in self.steps)}")
        if not 0 < self.alpha < 1:
            raise InvalidArgument(f"alpha must be in (0, 1), got {self.alpha:g}")
        if self.min_requests < 1:
            raise InvalidArgument(f"min_requests must be >= 1, got {self.min_requests}")
        if not self.max_stage_s > 0:
            raise InvalidArgument(f"max_stage_s must be > 0, got {self.max_stage_s:g}")
        for name, value in self.gates.items():
            kind = GATE_PARAMETERS.get(name)
            if kind is None:
                raise InvalidArgument(f"unknown gate '{name}' (gates: {', '.join(GATE_PARAMETERS)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgument(f"gate '{name}' takes a number ({kind}), got {value!r}")
            if kind == "ratio" and value < 1:
                raise InvalidArgument(f"gate '{name}': ratio {value:g} must be >= 1 (1 = not slower / costlier at all)")
            if kind in ("margin", "minimum") and not 0 <= value < 1:
                raise InvalidArgument(f"gate '{name}': {kind} {value:g} must be in [0, 1)")
        if self.shadow and not any(g in self.gates for g in SHADOW_GATES):
            raise InvalidArgument("the shadow stage needs the 'agreement' or 'error' gate; turn one on or set shadow: false")

    def stages(self) -> list[tuple[str, float]]:
        """(name, canary weight in percent) of each stage in order: shadow (weight 0) first when on."""
        return ([("shadow", 0.0)] if self.shadow else []) + [("canary", s) for s in self.steps]

    def gates_of(self, stage: str) -> list[str]:
        names = SHADOW_GATES if stage == "shadow" else CANARY_GATES
        return [g for g in names if g in self.gates]

    def alpha_per_test(self) -> float:
        """Bonferroni over every (stage, sequential gate) test: a wrong rollback needs one of them to fail wrongly
        (so at most their sum = alpha), a wrong promotion needs every test that the variant is worse on to pass."""
        tests = sum(1 for stage, _ in self.stages() for g in self.gates_of(stage) if g in SEQUENTIAL)
        return self.alpha / max(tests, 1)

    def alpha_to_pass(self) -> float:
        """The level of each gate's pass in the non-inferiority tests (gates.judge): the whole alpha, not split. A wrong
        promotion needs a gate that the variant is worse on by its margin to pass at every stage it is in, and its first
        such pass alone has chance <= alpha (each pass is anytime-valid at its level). A wrong rollback needs only one
        of the tests to fail, so the fail keeps alpha_per_test."""
        return self.alpha

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = list(self.steps)
        return out


PRESETS: dict[str, RolloutPlan] = {
    "default": RolloutPlan(),
    # Fewer, larger steps for a model with plenty of traffic.
    "fast": RolloutPlan(steps=(10.0, 50.0), min_requests=300, max_stage_s=900.0),
    # Small first steps and more evidence for a model whose errors cost a lot.
    "careful": RolloutPlan(steps=(1.0, 5.0, 25.0, 50.0), min_requests=2000, max_stage_s=4 * 3600.0, alpha=0.01),
}

_FIELDS = {"version", "preset", "steps", "shadow", "min_requests", "max_stage_s", "alpha", "gates"}


def plan_from_dict(d: Any) -> RolloutPlan:
    """A plan from a plan file's mapping: `preset` (default 'default') with any field overridden.

    `gates` maps a gate to its number, or to null / false to turn it off; gates not named keep the preset's.
    """
    if not isinstance(d, dict):
        raise InvalidArgument(f"a rollout plan is a mapping of fields ({', '.join(sorted(_FIELDS))}), got {type(d).__name__}")
    unknown = set(d) - _FIELDS
    if unknown:
        raise InvalidArgument(f"unknown rollout plan field {', '.join(sorted(unknown))} (fields: {', '.join(sorted(_FIELDS))})")
    preset_name = d.get("preset") or "default"
    if preset_name not in PRESETS:
        raise InvalidArgument(f"unknown rollout preset '{preset_name}' (presets: {', '.join(PRESETS)})")
    base = PRESETS[preset_name]
    gates = dict(base.gates)
    given = d.get("gates") or {}
    if not isinstance(given, dict):
        raise InvalidArgument(f"'gates' maps gate names to numbers, got {given!r}")
    for name, value in given.items():
        if name not in GATE_PARAMETERS:
            raise InvalidArgument(f"unknown gate '{name}' (gates: {', '.join(GATE_PARAMETERS)})")
        if value is None or value is False:
            gates.pop(name, None)
        else:
            gates[name] = value
    fields: dict[str, Any] = {k: v for k, v in d.items() if k in ("version", "shadow", "min_requests", "max_stage_s", "alpha")}
    if "steps" in d:
        steps = d["steps"]
        if isinstance(steps, str):
            steps = parse_steps(steps)
        if not isinstance(steps, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in steps):
            raise InvalidArgument(f"'steps' is a list of percents, e.g. [5, 25, 50], got {steps!r}")
        fields["steps"] = tuple(steps)
    for key, kind in (("min_requests", int), ("max_stage_s", (int, float)), ("alpha", (int, float)), ("shadow", bool)):
        if key in fields and (not isinstance(fields[key], kind) or (kind is not bool and isinstance(fields[key], bool))):
            raise InvalidArgument(f"rollout plan field '{key}' has the wrong type: {fields[key]!r}")
    return replace(base, gates=gates, **fields)


def plan_from_json(text: str) -> RolloutPlan:
    """The plan a client sent (its plan file, read as YAML or JSON, travels as JSON); empty: the default plan."""
    if not text.strip():
        return PRESETS["default"]
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"the rollout plan is not valid JSON: {e}") from e
    return plan_from_dict(d)


def parse_steps(text: str) -> list[float]:
    """'5,25,50' -> [5.0, 25.0, 50.0]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgument(f"steps '{text}' are not comma-separated percents, e.g. 5,25,50") from None
