"""Rollout gates in simulation: false promotions, power and requests to a decision of the controller's non-inferiority
SPRTs, against today's two-sided mixture sequences, a fixed-sample test looked at every interval (peeking) and a
fixed-horizon test looked at once per stage.

    python -m bench.bench_rollout [--runs 200] [--rps 100] [--interval-s 30] [--workers 2] [--seed 0] [--json] [--single]

Each run is one rollout through the real stage machine (server/rollout/controller.py: shadow, canary 5, 25, 50 %,
promote) with simulated arms: every look, `rps x interval` requests arrive; the control and the canary answer with
their own error rate (Bernoulli), latency (lognormal) and top-1 agreement with the control (in shadow). The methods
differ only in the tests the gates decide by:

- sprt (the default, gates.judge): non-inferiority SPRTs, the null "worse by the margin" (server/rollout/sequential.py);
- mixture (gates.judge_mixture): the two-sided beta-binomial mixture confidence sequences, the gates before issue 24;
- peeking: the mixture's decision rule on fixed-sample intervals (normal approximation; order statistics for
  quantiles) at every look, as a dashboard or a Flagger-style analysis re-testing a fixed-sample test does;
- fixed horizon: the same fixed-sample intervals, looked at once per stage when the canary has answered the sample
  size that gives 90% power to pass an equal variant on the error gate; undecided then is a rollback.

Scenarios (SCENARIOS): an equal variant and a better one (should be promoted); one exactly at the error gate's margin
and three past a gate's margin (any promotion is a false one). Prints one table: promoted share, its 95% interval,
median / mean requests (both arms) until the decision and the median as a multiple of the fixed horizon's; with
--json, one JSON list instead, one object per scenario and method.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.stats import norm

from slimserve.server.rollout.controller import RolloutController
from slimserve.server.rollout.gates import Arm, judge, judge_mixture
from slimserve.server.rollout.plan import RolloutPlan
from slimserve.server.rollout.sequential import costlier
from slimserve.server.rollout.state import GateResult
from slimserve.server.store.traffic import TrafficPolicy

# The plan under test: the default stages and alpha; margins at the scenarios' edges; no feedback (accuracy is judged
# by agreement in shadow, as the issue asks where no labels arrive).
PLAN = RolloutPlan(
    steps=(5.0, 25.0, 50.0),
    min_requests=500,
    max_stage_s=1800.0,
    alpha=0.05,
    gates={"error": 0.01, "latency_p50": 1.2, "latency_p99": 1.5, "agreement": 0.98, "cost": 1.25},
)
# One test alone, where peeking shows: a single canary stage with the error gate only (alpha 0.05 all to it).
SINGLE = RolloutPlan(steps=(50.0,), shadow=False, min_requests=500, max_stage_s=1800.0, alpha=0.05, gates={"error": 0.01})
BASE_LATENCY = (math.log(0.005), 0.5)  # lognormal: median 5 ms


@dataclass(frozen=True)
class Behaviour:
    errors: float = 0.01
    slower: float = 1.0  # latency multiplier
    agreement: float = 0.995  # top-1 agreement with the control, as a shadow


CONTROL = Behaviour()
SCENARIOS: dict[str, tuple[Behaviour, bool]] = {  # name -> (canary, should be promoted)
    "equal": (Behaviour(), True),
    "better": (Behaviour(errors=0.005, slower=0.9), True),  # half the errors, 10% faster
    "at_margin": (Behaviour(errors=0.02), False),  # 1 point more errors: exactly the error gate's margin
    "worse_accuracy": (Behaviour(agreement=0.97), False),  # 2 points less agreement: 1 point under the minimum 98%
    "worse_latency": (Behaviour(slower=1.3), False),  # 30% slower at every quantile: past the p50 ratio 1.2
    "worse_errors": (Behaviour(errors=0.025), False),  # 1.5 points more errors: past the margin
}
DESCRIBED = {
    "equal": "the control's errors, latency and 99.5% agreement",
    "better": "half the errors, 10% faster",
    "at_margin": "1 point more errors, the margin exactly",
    "worse_accuracy": "97% agreement, minimum 98%",
    "worse_latency": "30% slower, p50 ratio 1.2",
    "worse_errors": "1.5 points more errors, margin 1",
}
SINGLE_SCENARIOS = ("equal", "at_margin")
METHODS = ("sprt", "mixture", "peeking", "fixed horizon")
DEFAULT_METHOD = "sprt"  # gates.judge: what the controller runs


# ---------------------------------------------------------------------------------------------- the simulated world


@dataclass
class Info:
    variants: dict
    traffic: TrafficPolicy
    rollout: dict | None = None

    @property
    def default_variant(self) -> str:
        return max(self.traffic.weights, key=self.traffic.weights.get)


class Repository:
    def __init__(self) -> None:
        self.info = Info({"control": 1, "canary": 1}, TrafficPolicy.single("control"))

    def check_writable(self) -> None:
        pass

    def get(self, name: str) -> Info:
        return self.info

    def names(self) -> list[str]:
        return ["m"]

    def update(self, name, change):
        change(self.info)
        return self.info


class Router:
    """The controller's routing calls, applied to the simulated model's policy."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    async def set_traffic(self, model, weights, shadows, sticky, *, automatic=False):
        total = sum(weights.values())
        self.repository.info.traffic = TrafficPolicy({k: v / total for k, v in weights.items()}, tuple(shadows), sticky)
        return self.repository.info.traffic

    async def promote(self, model, variant, *, automatic=False):
        self.repository.info.traffic = TrafficPolicy.single(variant)
        return self.repository.info.traffic

    def ready_variants(self, model):
        return {"control", "canary"}


@dataclass
class SimArm:
    behaviour: Behaviour
    counts: Arm = field(default_factory=Arm)
    latency: np.ndarray = field(default_factory=lambda: np.zeros(1 << 16))


class Simulation:
    """ArmStatistics over simulated traffic: `serve` adds one interval's requests as routed now."""

    source = "simulation"

    def __init__(self, canary: Behaviour, rng: np.random.Generator) -> None:
        self.rng = rng
        self.arms = {"control": SimArm(CONTROL), "canary": SimArm(canary)}

    def _answer(self, arm: SimArm, n: int, mirrored: bool) -> None:
        b, rng = arm.behaviour, self.rng
        errors = int(rng.binomial(n, b.errors))
        latency = rng.lognormal(*BASE_LATENCY, n - errors) * b.slower
        c = arm.counts
        end = c.latency_mark + latency.size
        if end > arm.latency.size:
            arm.latency = np.concatenate([arm.latency, np.zeros(max(end, arm.latency.size))])
        arm.latency[c.latency_mark : end] = latency
        agreed = int(rng.binomial(n, b.agreement)) if mirrored else 0
        arm.counts = replace(
            c,
            requests=c.requests + n,
            errors=c.errors + errors,
            latency_mark=end,
            device_seconds=c.device_seconds + float(latency.sum()),
            agreed=c.agreed + agreed,
            mirrored=c.mirrored + (n if mirrored else 0),
        )

    def serve(self, policy: TrafficPolicy, n: int) -> None:
        to_canary = int(self.rng.binomial(n, policy.weights.get("canary", 0.0)))
        self._answer(self.arms["control"], n - to_canary, False)
        if to_canary:
            self._answer(self.arms["canary"], to_canary, False)
        if "canary" in policy.shadows:
            self._answer(self.arms["canary"], n, True)

    async def refresh(self, model, variants) -> None:
        pass

    def arm(self, model: str, variant: str) -> Arm:
        return self.arms[variant].counts

    def latencies_since(self, model: str, variant: str, mark: int) -> np.ndarray:
        a = self.arms[variant]
        return a.latency[mark : a.counts.latency_mark]


# ---------------------------------------------------------------------------------------------- fixed-sample gates


def _z(alpha: float) -> float:
    return float(norm.ppf(1 - alpha / 2))


def fixed_judge(plan: RolloutPlan, stage: str, canary: Arm, control: Arm, lat1: np.ndarray, lat0: np.ndarray) -> list[GateResult]:
    """gates.judge's decision rules on fixed-sample (two-sided, level 1 - alpha) intervals instead of confidence sequences."""
    alpha = plan.alpha_per_test()
    z = _z(alpha)
    out = []
    for name in plan.gates_of(stage):
        value = plan.gates[name]
        if name == "error":
            n1, n0 = max(canary.requests, 1), max(control.requests, 1)
            p1, p0 = canary.errors / n1, control.errors / n0
            se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0) if canary.requests and control.requests else math.inf
            low, high = p1 - p0 - z * se, p1 - p0 + z * se
            d = "fail" if low > value else "pass" if high < value else "continue"
        elif name == "agreement":
            n = canary.mirrored
            p = canary.agreed / n if n else 0.0
            half = z * math.sqrt(p * (1 - p) / n) if n else math.inf
            d = "pass" if p - half >= value else "fail" if p + half < value else "continue"
        elif name in ("latency_p50", "latency_p99"):
            q = 0.5 if name == "latency_p50" else 0.99
            lo1, hi1 = _quantile_ci(lat1, q, _z(alpha / 2))
            lo0, hi0 = _quantile_ci(lat0, q, _z(alpha / 2))
            d = "fail" if lo1 > value * hi0 else "pass" if hi1 <= value * lo0 and lo0 > 0 else "continue"
        elif name == "cost":
            d = costlier((canary.device_seconds, canary.requests), (control.device_seconds, control.requests), value).decision
        else:  # accuracy: the bench sends no feedback, so it is skipped as judge skips it
            d = "skip"
        out.append(GateResult(name, d, None, value, "fixed-sample"))
    return out


def _quantile_ci(x: np.ndarray, q: float, z: float) -> tuple[float, float]:
    n = x.size
    if n == 0:
        return 0.0, math.inf
    half = z * math.sqrt(n * q * (1 - q))
    lo, hi = math.floor(n * q - half), math.ceil(n * q + half)
    kth = [i for i in (lo, hi) if 0 <= i < n]
    part = np.partition(x, kth) if kth else x
    return (float(part[lo]) if lo >= 0 else 0.0), (float(part[hi]) if hi < n else math.inf)


def horizon(plan: RolloutPlan, power: float = 0.9, base_error: float = CONTROL.errors) -> int:
    """Canary requests per stage at which the fixed-sample error gate passes an equal variant with `power`
    (two arms of that size; the control has at least as many at every canary weight up to 50%)."""
    z = _z(plan.alpha_per_test()) + float(norm.ppf(power))
    return math.ceil(z * z * 2 * base_error * (1 - base_error) / plan.gates["error"] ** 2)


def fixed_horizon_judge(n: int):
    def decide(plan, stage, canary, control, lat1, lat0):
        seen = canary.mirrored if stage == "shadow" else canary.requests
        if seen < n:
            return [GateResult(g, "continue", None, plan.gates[g], "before the horizon") for g in plan.gates_of(stage)]
        # the one look: what is not shown as good is a fail
        return [
            replace(g, decision="fail") if g.decision == "continue" else g for g in fixed_judge(plan, stage, canary, control, lat1, lat0)
        ]

    return decide


# ---------------------------------------------------------------------------------------------- runs


def one_rollout(method: str, canary: Behaviour, seed: int, rps: float, interval_s: float, plan: RolloutPlan = PLAN) -> tuple[bool, int]:
    """(promoted, requests of both arms until the decision) of one simulated rollout."""
    rng = np.random.default_rng(seed)
    repository = Repository()
    sim = Simulation(canary, rng)
    clock = [0.0]
    decide = {"sprt": judge, "mixture": judge_mixture, "peeking": fixed_judge, "fixed horizon": fixed_horizon_judge(horizon(plan))}[method]
    controller = RolloutController(repository, Router(repository), sim, lambda: clock[0], judge=decide)
    per_look = round(rps * interval_s)

    async def run() -> str:
        await controller.start("m", "canary", plan)
        await controller.tick()  # the first stage's snapshot
        while "m" in controller.running:
            sim.serve(repository.info.traffic, per_look)
            clock[0] += interval_s
            await controller.tick()
        return controller.status("m").state

    state = asyncio.run(run())
    total = sum(a.counts.requests - a.counts.mirrored for a in sim.arms.values())
    return state == "promoted", total


def scenario_runs(args: tuple[str, str, int, int, float, float, bool]) -> tuple[str, str, bool, list[tuple[bool, int]]]:
    method, name, runs, seed, rps, interval_s, single = args
    canary, _ = SCENARIOS[name]
    plan = SINGLE if single else PLAN
    return method, name, single, [one_rollout(method, canary, seed + i, rps, interval_s, plan) for i in range(runs)]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rows(args) -> dict[tuple[str, str, bool], list[tuple[bool, int]]]:
    """(method, scenario, single plan) -> [(promoted, requests)] of every run, on `args.workers` processes."""
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {', '.join(unknown)} (methods: {', '.join(METHODS)})")
    chunk = 25  # runs per job: rows share the workers evenly
    wanted = [(m, name, False) for m in methods for name in SCENARIOS]
    if args.single:
        wanted += [(m, name, True) for m in methods for name in SINGLE_SCENARIOS]
    jobs = [
        (m, name, min(chunk, args.runs - first), args.seed + first, args.rps, args.interval_s, single)
        for m, name, single in wanted
        for first in range(0, args.runs, chunk)
    ]
    done: dict[tuple[str, str, bool], list[tuple[bool, int]]] = {key: [] for key in wanted}
    with ProcessPoolExecutor(args.workers) as pool:
        for method, name, single, runs in pool.map(scenario_runs, jobs):
            done[(method, name, single)].extend(runs)
    return done


def summary(done: dict[tuple[str, str, bool], list[tuple[bool, int]]]) -> list[dict]:
    """The --json list: one object per scenario and method of the full plan (fixed_horizon_requests: the fixed-horizon
    method's median in that scenario, when it ran)."""
    out = []
    for (method, name, single), runs in done.items():
        if single:
            continue
        requests = np.array([n for _, n in runs])
        fixed = done.get(("fixed horizon", name, False))
        out.append(
            {
                "scenario": name,
                "method": method,
                "default": method == DEFAULT_METHOD,
                "runs": len(runs),
                "promoted_fraction": sum(p for p, _ in runs) / len(runs),
                "median_requests": float(np.median(requests)),
                "mean_requests": float(requests.mean()),
                "fixed_horizon_requests": float(np.median([n for _, n in fixed])) if fixed else None,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="rollouts per scenario and method")
    parser.add_argument("--rps", type=float, default=100.0, help="requests per second to the model")
    parser.add_argument("--interval-s", type=float, default=30.0, help="seconds between the controller's looks")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="sprt,mixture,fixed horizon", help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--single", action="store_true", help="also one gate alone in one stage (where peeking shows)")
    parser.add_argument("--json", action="store_true", help="print one JSON list, one object per scenario and method")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    done = rows(args)
    table = summary(done)
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print(
        f"{args.runs} rollouts per row; plan: shadow, canary {', '.join(f'{s:g}' for s in PLAN.steps)} %, alpha {PLAN.alpha:g} "
        f"(a pass at {PLAN.alpha_to_pass():.4g}; a fail at {PLAN.alpha_per_test():.4g} per test), min {PLAN.min_requests} "
        f"requests and {PLAN.max_stage_s:g} s per stage; {args.rps:g} requests/s, a look every {args.interval_s:g} s; "
        f"fixed horizon {horizon(PLAN)} canary requests per stage"
    )
    print()
    print("| scenario | canary | method | should | promoted | 95% interval | median requests | mean requests | median / fixed horizon |")
    print("| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |")
    for row in sorted(table, key=lambda r: (list(SCENARIOS).index(r["scenario"]), METHODS.index(r["method"]))):
        k = round(row["promoted_fraction"] * row["runs"])
        lo, hi = wilson(k, row["runs"])
        ratio = f"{row['median_requests'] / row['fixed_horizon_requests']:.2f}x" if row["fixed_horizon_requests"] else "-"
        name = row["scenario"]
        print(
            f"| {name} | {DESCRIBED[name]} | {row['method']}{' (default)' if row['default'] else ''} "
            f"| {'promote' if SCENARIOS[name][1] else 'not promote'} | {row['promoted_fraction']:.1%} | [{lo:.1%}, {hi:.1%}] "
            f"| {int(row['median_requests']):,} | {int(row['mean_requests']):,} | {ratio} |"
        )
    if args.single:
        print(
            f"\none gate alone (error, margin 1 point, alpha {SINGLE.alpha:g}), one canary stage at {SINGLE.steps[0]:g}%, "
            f"fixed horizon {horizon(SINGLE)}: where re-testing a fixed-sample test shows\n"
        )
        print("| scenario | method | promoted | 95% interval | median requests | mean requests |")
        print("| --- | --- | ---: | --- | ---: | ---: |")
        for (method, name, single), runs in done.items():
            if not single:
                continue
            k = sum(p for p, _ in runs)
            lo, hi = wilson(k, len(runs))
            requests = np.array([n for _, n in runs])
            print(
                f"| {name} | {method} | {k / len(runs):.1%} | [{lo:.1%}, {hi:.1%}] | {int(np.median(requests)):,} "
                f"| {int(requests.mean()):,} |"
            )
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
