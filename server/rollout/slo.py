"""Holding a latency objective by moving a model's traffic between its variants: the policy, its checks and the steps.

Pure domain code, no server state (issue 24, "SLO routing"). `SloPolicy` is the objective (`--p99 MS`, `--max-drop PT`)
and checks itself; `check_policy` judges it against the model's variants (what each answers at batch 1, how much
accuracy each gives up against the baseline) and the rollout in progress, with the issue's answers to bad input;
`SloSteering.look` is one look of the loop: from the live p99 of the current split (or the queue's predicted wait)
it returns the next shift, if any, with its reason and the expected accuracy cost.

server/rollout/slo_controller.py runs it in the server (slimserve.v1 Rollout.SetSlo / GetSlo, `slimctl slo`).

The rules of a look:
- shadows are paused first: while any shadow runs, the first breach pauses them and moves nothing;
- while the objective is broken (p99 or predicted wait above it), STEP of the share moves from the slowest variant
  taking traffic to the fastest eligible one (within max_drop of the baseline's quality);
- traffic returns one STEP at a time, toward the split the policy started from, only after CALM consecutive looks with
  the p99 under RETURN_BELOW x the objective (hysteresis: the band between the two thresholds moves nothing, and a
  breach restarts the count, so the split cannot flap between two looks), and, when the look knows the request rate
  and each variant's compute time per request, only if the split after the step keeps every variant's predicted p99
  (`predicted_p99_s`: its compute time plus the p99 wait of a queue at its utilization, share x rate x compute time)
  under RETURN_BELOW x the objective: a fast variant's low p99 under a load that the slow one cannot carry is no
  reason to go back; a breach right after a step back doubles the calm looks the next step back needs (up to
  MAX_CALM; back to CALM once the original split is reached), so a load that stays high cannot make it oscillate;
  shadows resume once the split is back;
- every eligible variant gives up at most max_drop, so the expected cost (share x drop, summed) never exceeds it;
- when the split is already all on the fastest eligible variant and the objective still breaks, the answer is to
  refuse beyond the queue's capacity (RESOURCE_EXHAUSTED), which `Shift.saturated` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from slimserve.server.errors import InvalidArgument

STEP = 0.25  # of the model's traffic moved per look
RETURN_BELOW = 0.6  # x the objective: the p99 under which traffic may return
SHED_BREACH = 0.01  # share of a look's requests shed (refused, dropped at their deadline) that breaks the objective
CALM = 3  # looks under RETURN_BELOW before a step back
MAX_CALM = 48  # a step back that was followed by a breach doubles the looks the next one needs, up to this
P99_WAITS = math.log(100.0) / 2  # an M/D/1 queue's p99 wait, in mean service times x rho / (1 - rho) (approximately)
MAX_DROP_PT = 100.0


def predicted_p99_s(service_s: float, utilization: float) -> float:
    """A variant's p99 latency at `utilization` (share x rate x compute time): one compute plus the p99 wait of an
    M/D/1 queue, P99_WAITS x compute x rho / (1 - rho); infinite at or past full utilization."""
    if utilization >= 1.0:
        return math.inf
    return service_s * (1.0 + P99_WAITS * utilization / (1.0 - utilization))


@dataclass(frozen=True)
class SloPolicy:
    """p99_ms: the latency objective; max_drop_pt: accuracy points a variant may give up against the baseline."""

    p99_ms: float
    max_drop_pt: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.p99_ms, bool) or not isinstance(self.p99_ms, (int, float)) or not math.isfinite(self.p99_ms) or self.p99_ms <= 0:
            raise InvalidArgument(f"--p99 {self.p99_ms!r} is out of range: the objective is a latency in milliseconds > 0, e.g. --p99 50")
        if (
            isinstance(self.max_drop_pt, bool)
            or not isinstance(self.max_drop_pt, (int, float))
            or not math.isfinite(self.max_drop_pt)
            or not 0 <= self.max_drop_pt < MAX_DROP_PT
        ):
            raise InvalidArgument(
                f"--max-drop {self.max_drop_pt!r} is out of range: it is accuracy points in [0, {MAX_DROP_PT:g}) a variant may give up, e.g. 1"
            )


@dataclass(frozen=True)
class VariantProfile:
    """What the policy needs of one variant: its batch-1 latency and its accuracy drop against the baseline (points)."""

    name: str
    batch1_ms: float
    drop_pt: float


@dataclass(frozen=True)
class Checked:
    """The policy accepted: the variants it may move traffic to (fastest first), warnings, and whether it waits."""

    eligible: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    waiting: str = ""  # why the policy is not applied yet (a rollout in progress); empty: applied


def check_policy(policy: SloPolicy, model: str, profiles: list[VariantProfile], rollout_variant: str | None = None) -> Checked:
    """The issue's answers to bad input: no variant within max_drop but the baseline is refused (InvalidArgument,
    listing each variant's drop); an objective below what the fastest eligible variant answers at batch 1 is accepted
    with a warning naming that latency; during a rollout the policy is accepted and waits, saying so."""
    if not profiles:
        raise InvalidArgument(f"model '{model}' has no variants measured yet: an SLO needs each variant's batch-1 latency and accuracy")
    eligible = sorted((p for p in profiles if p.drop_pt <= policy.max_drop_pt), key=lambda p: p.batch1_ms)
    baseline_ms = max((p.batch1_ms for p in profiles if p.drop_pt <= 0), default=None)
    faster = [p for p in eligible if baseline_ms is None or p.batch1_ms < baseline_ms]
    if not faster:
        listing = ", ".join(f"{p.name} ({p.drop_pt:+.2f} pt, {p.batch1_ms:.3g} ms)" for p in sorted(profiles, key=lambda p: p.drop_pt))
        raise InvalidArgument(
            f"model '{model}': no variant faster than the baseline gives up at most {policy.max_drop_pt:g} accuracy points "
            f"(variants: {listing}); raise --max-drop or optimize a faster variant first"
        )
    warnings = []
    fastest = eligible[0]
    if policy.p99_ms < fastest.batch1_ms:
        warnings.append(
            f"the objective p99 {policy.p99_ms:g} ms is below what the fastest variant within {policy.max_drop_pt:g} points "
            f"('{fastest.name}') answers at batch 1 ({fastest.batch1_ms:.3g} ms): it cannot be held; requests past the "
            "queue's capacity will be refused"
        )
    waiting = ""
    if rollout_variant is not None:
        waiting = f"a rollout of '{rollout_variant}' is running on model '{model}': its gates win, and the SLO waits until it ends"
    return Checked(tuple(p.name for p in eligible), tuple(warnings), waiting)


@dataclass(frozen=True)
class Shift:
    """One change the steering asks for: new weights (or shadows paused / resumed), why, and the expected cost."""

    weights: dict[str, float]
    reason: str
    cost_pt: float
    kind: str  # toward_fast | back | pause_shadows | resume_shadows | saturated: the metric's reason label
    pause_shadows: bool = False
    resume_shadows: bool = False
    saturated: bool = False  # all on the fastest eligible variant and still breaking: refuse beyond capacity


@dataclass
class SloSteering:
    """The loop's memory for one model: the split it started from, the eligible variants (fastest first), their drops."""

    policy: SloPolicy
    original: dict[str, float]
    eligible: tuple[str, ...]
    drops: dict[str, float]
    latency_ms: dict[str, float]  # batch-1 latency of each variant: which is slower
    shadows_paused: bool = False
    calm: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    calm_needed: int = CALM
    stepped_back: bool = False  # the last shift was a step back
    _what: str = "p99"  # which signal broke the objective at the last look, and by how much (the reason names it)

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = dict(self.original)

    def cost(self, weights: dict[str, float]) -> float:
        """Expected accuracy cost in points: each variant's share x its drop, summed."""
        return sum(w * max(self.drops.get(v, 0.0), 0.0) for v, w in weights.items())

    def look(
        self,
        p99_ms: float,
        predicted_wait_ms: float = 0.0,
        has_shadows: bool = False,
        rate_rps: float | None = None,
        service_s: dict[str, float] | None = None,
        shed_fraction: float = 0.0,
    ) -> Shift | None:
        """One look. `shed_fraction`: the share of the look's requests the queues refused or dropped at their deadline
        (never answered); over SHED_BREACH it breaks the objective whatever the answered requests' p99 (shedding load must
        not hide it: the p99 of every request, the shed ones counted as past any deadline, is then unbounded)."""
        slo = self.policy.p99_ms
        worst = max(p99_ms, predicted_wait_ms)
        what = "p99" if p99_ms >= predicted_wait_ms else "the queue's predicted wait"
        self._what = f"{what} {worst:.3g} ms"
        if shed_fraction > SHED_BREACH:
            worst = math.inf
            self._what = f"{shed_fraction:.1%} of requests shed (refused or dropped at their deadline)"
        if worst > slo:
            self.calm = 0
            if self.stepped_back:  # that step back was too early: wait twice as long before the next one
                self.calm_needed = min(self.calm_needed * 2, MAX_CALM)
                self.stepped_back = False
            if has_shadows and not self.shadows_paused:
                self.shadows_paused = True
                return Shift(
                    dict(self.weights),
                    f"{self._what} > objective {slo:g} ms: shadows paused first",
                    self.cost(self.weights),
                    "pause_shadows",
                    pause_shadows=True,
                )
            return self._toward_fast(worst)
        if p99_ms < RETURN_BELOW * slo and predicted_wait_ms < RETURN_BELOW * slo:
            self.calm += 1
            if self.calm >= self.calm_needed:
                self.calm = 0
                shift = self._back(p99_ms, rate_rps, service_s)
                self.stepped_back = shift is not None and shift.kind == "back"
                if all(abs(self.weights.get(v, 0.0) - w) < 1e-9 for v, w in self.original.items()):
                    self.calm_needed = CALM
                return shift
        else:
            self.calm = 0  # the band between RETURN_BELOW x and 1 x the objective: hold
        return None

    def _toward_fast(self, worst: float) -> Shift:
        slo = self.policy.p99_ms
        fastest = self.eligible[0]
        donors = [v for v, w in self.weights.items() if w > 1e-9 and v != fastest]
        if not donors:
            return Shift(
                dict(self.weights),
                f"{self._what} > objective {slo:g} ms with all traffic on the fastest variant within "
                f"{self.policy.max_drop_pt:g} points ('{fastest}'): requests past the queue's capacity are refused",
                self.cost(self.weights),
                "saturated",
                saturated=True,
            )
        slowest = max(donors, key=lambda v: self.latency_ms.get(v, math.inf))
        moved = min(STEP, self.weights[slowest])
        weights = dict(self.weights)
        weights[slowest] -= moved
        weights[fastest] = weights.get(fastest, 0.0) + moved
        self.weights = {v: w for v, w in weights.items() if w > 1e-9 or v in self.original}
        cost = self.cost(self.weights)
        return Shift(
            dict(self.weights),
            f"{self._what} > objective {slo:g} ms: {moved:.0%} of traffic from '{slowest}' to '{fastest}' "
            f"(expected accuracy cost {cost:.2f} of {self.policy.max_drop_pt:g} points)",
            cost,
            "toward_fast",
        )

    def _back(self, p99_ms: float, rate_rps: float | None = None, service_s: dict[str, float] | None = None) -> Shift | None:
        slo = self.policy.p99_ms
        if self.weights == self.original or all(abs(self.weights.get(v, 0.0) - w) < 1e-9 for v, w in self.original.items()):
            if self.shadows_paused:
                self.shadows_paused = False
                return Shift(
                    dict(self.weights),
                    f"p99 {p99_ms:.3g} ms under {RETURN_BELOW:g} x the objective: shadows resumed",
                    0.0,
                    "resume_shadows",
                    resume_shadows=True,
                )
            return None
        # give back to the variant furthest below its original share, from the one furthest above it
        under = max(self.original, key=lambda v: self.original[v] - self.weights.get(v, 0.0))
        over = max(self.weights, key=lambda v: self.weights[v] - self.original.get(v, 0.0))
        moved = min(STEP, self.original[under] - self.weights.get(under, 0.0), self.weights[over] - self.original.get(over, 0.0))
        weights = dict(self.weights)
        weights[over] -= moved
        weights[under] = weights.get(under, 0.0) + moved
        if rate_rps is not None and service_s:
            bound = RETURN_BELOW * slo / 1000.0
            late = [
                v
                for v, w in weights.items()
                if w > 0 and v in service_s and predicted_p99_s(service_s[v], w * rate_rps * service_s[v]) >= bound
            ]
            if late:
                return None  # the load that broke the objective is still there: hold
        self.weights = {v: w for v, w in weights.items() if w > 1e-9 or v in self.original}
        return Shift(
            dict(self.weights),
            f"p99 {p99_ms:.3g} ms under {RETURN_BELOW:g} x the objective {slo:g} ms for {self.calm_needed} looks: {moved:.0%} of traffic "
            f"back from '{over}' to '{under}'",
            self.cost(self.weights),
            "back",
        )
