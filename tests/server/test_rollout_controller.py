"""The rollout stage machine (server/rollout/controller.py) on fake statistics and routing: ticks are driven, nothing sleeps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from slimserve.server.errors import FailedPrecondition, InvalidArgument, NotFound
from slimserve.server.rollout.controller import RolloutController
from slimserve.server.rollout.gates import Arm
from slimserve.server.rollout.plan import PRESETS, RolloutPlan, parse_steps, plan_from_dict, plan_from_json
from slimserve.server.rollout.state import RolloutState
from slimserve.server.store.traffic import TrafficPolicy


@dataclass
class FakeInfo:
    variants: dict
    traffic: TrafficPolicy
    rollout: dict | None = None

    @property
    def default_variant(self) -> str:
        w = self.traffic.weights
        return max(w, key=w.get)


class FakeRepository:
    def __init__(self) -> None:
        self.infos = {"m": FakeInfo({"baseline": 1, "int8": 1}, TrafficPolicy.single())}
        self.read_only = False

    def check_writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition("read-only")

    def get(self, name):
        if name not in self.infos:
            raise NotFound(f"no model '{name}'")
        return self.infos[name]

    def names(self):
        return list(self.infos)

    def update(self, name, change):
        change(self.get(name))
        return self.get(name)


@dataclass
class FakeTraffic:
    repository: FakeRepository
    calls: list = field(default_factory=list)

    async def set_traffic(self, model, weights, shadows, sticky, *, automatic=False):
        total = sum(weights.values())
        policy = TrafficPolicy({k: v / total for k, v in weights.items()}, tuple(shadows), sticky)
        self.repository.infos[model].traffic = policy
        self.calls.append(("set", dict(policy.weights), tuple(shadows)))
        return policy

    async def promote(self, model, variant, *, automatic=False):
        self.repository.infos[model].traffic = TrafficPolicy.single(variant)
        self.calls.append(("promote", variant))
        return self.repository.infos[model].traffic

    def ready_variants(self, model):
        return set(self.repository.infos[model].variants)


class FakeStatistics:
    """Arms whose counters the test advances: `serve(n, ...)` adds n requests to each arm with given rates."""

    source = "fake"

    def __init__(self, seed: int = 0) -> None:
        self.arms = {"baseline": Arm(), "int8": Arm()}
        self.latency = {"baseline": [], "int8": []}
        self.rng = np.random.default_rng(seed)

    def serve(self, variant, n, *, errors=0.0, slow=1.0, agree=1.0, mirrored=False, labelled=0, accuracy=0.9, device=0.001):
        a = self.arms[variant]
        e = int(self.rng.binomial(n, errors)) if errors else 0
        lat = list(self.rng.lognormal(-6, 0.3, n - e) * slow)
        self.latency[variant] += lat
        correct = int(self.rng.binomial(labelled, accuracy)) if labelled else 0
        agreed = int(self.rng.binomial(n, agree)) if mirrored else 0
        self.arms[variant] = replace(
            a,
            requests=a.requests + n,
            errors=a.errors + e,
            latency_mark=a.latency_mark + len(lat),
            device_seconds=a.device_seconds + device * n,
            correct=a.correct + correct,
            labelled=a.labelled + labelled,
            agreed=a.agreed + agreed,
            mirrored=a.mirrored + (n if mirrored else 0),
        )

    async def refresh(self, model, variants):
        pass

    def arm(self, model, variant):
        return self.arms[variant]

    def latencies_since(self, model, variant, mark):
        return np.array(self.latency[variant][mark:])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world():
    repository = FakeRepository()
    traffic = FakeTraffic(repository)
    stats = FakeStatistics()
    clock = Clock()
    return RolloutController(repository, traffic, stats, clock), repository, traffic, stats, clock


FAST = RolloutPlan(steps=(10.0, 50.0), min_requests=200, max_stage_s=600.0, gates={"error": 0.01, "latency_p50": 1.2, "agreement": 0.9})


def drive(controller, stats, *, ticks=40, per_tick=100, canary=None, control=None):
    if control is None:
        control = {}
    if canary is None:
        canary = {}

    async def run():
        for _ in range(ticks):
            r = controller.running.get("m")
            if r is None:
                return
            share = r.weight / 100 if r.state == "canary" else 1.0
            stats.serve("int8", max(1, int(per_tick * share)), mirrored=r.state == "shadow", **(canary or {}))
            stats.serve("baseline", int(per_tick * (1 - share)) if r.state == "canary" else per_tick, **(control or {}))
            await controller.tick()

    asyncio.run(run())


def test_a_good_variant_goes_shadow_then_each_canary_step_then_is_promoted(world):
    controller, repository, traffic, stats, _ = world
    r = asyncio.run(controller.start("m", "int8", FAST))
    assert r.state == "shadow" and traffic.calls[0] == ("set", {"baseline": 1.0}, ("int8",))
    drive(controller, stats, ticks=200)
    r = controller.status("m")
    assert r.state == "promoted", r.reason
    assert [c[1] for c in traffic.calls] == [{"baseline": 1.0}, {"baseline": 0.9, "int8": 0.1}, {"baseline": 0.5, "int8": 0.5}, "int8"]
    assert [e.kind for e in r.history] == ["started", "stage", "stage", "stage", "promoted"]
    assert repository.infos["m"].rollout["state"] == "promoted"  # persisted
    record = r.record()
    assert record["state"] == "promoted" and record["variant"] == "int8" and record["control"] == "baseline"
    assert {g["name"] for g in record["gates"]} == {"error", "latency_p50"}


def test_a_variant_that_errs_is_rolled_back_at_once_with_the_gate_and_its_evidence(world):
    controller, _repository, traffic, stats, _ = world
    asyncio.run(controller.start("m", "int8", replace(FAST, shadow=False)))
    drive(controller, stats, canary={"errors": 0.2})
    r = controller.status("m")
    assert r.state == "rolled_back" and "gate 'error' failed at canary 10%" in r.reason
    assert r.history[-1].gate == "error" and r.history[-1].statistic > 0.1 and "error rate" in r.history[-1].evidence
    assert traffic.calls[-1] == ("set", {"baseline": 1.0}, ())  # back to where it started
    assert r.requests["int8"] < 200  # caught before the stage's minimum


def test_a_slow_variant_fails_the_latency_gate_and_a_disagreeing_shadow_the_agreement_gate(world):
    controller, _, _, stats, _ = world
    asyncio.run(controller.start("m", "int8", replace(FAST, shadow=False)))
    drive(controller, stats, canary={"slow": 2.0})
    assert controller.status("m").history[-1].gate == "latency_p50"
    asyncio.run(controller.start("m", "int8", FAST))
    drive(controller, stats, canary={"agree": 0.5})
    r = controller.status("m")
    assert r.state == "rolled_back" and r.history[-1].gate == "agreement" and "the shadow stage" in r.reason


def test_accuracy_is_gated_only_once_labels_arrive(world):
    controller, _, _, stats, _ = world
    plan = RolloutPlan(steps=(50.0,), shadow=False, min_requests=100, gates={"accuracy": 0.01})
    asyncio.run(controller.start("m", "int8", plan))
    drive(controller, stats, ticks=1)
    r = controller.status("m")
    assert r.gates[0].decision == "skip" and r.state == "canary"  # no labels: not gated, the minimum not reached yet
    drive(controller, stats, ticks=100, canary={"labelled": 50, "accuracy": 0.7}, control={"labelled": 50, "accuracy": 0.95})
    assert controller.status("m").history[-1].gate == "accuracy"


def test_an_undecided_stage_rolls_back_at_its_time_limit(world):
    controller, _, _traffic, stats, clock = world
    asyncio.run(controller.start("m", "int8", replace(FAST, shadow=False)))
    drive(controller, stats, ticks=1, per_tick=20)
    clock.now += 601
    drive(controller, stats, ticks=1, per_tick=20)
    r = controller.status("m")
    assert r.state == "rolled_back" and "not shown as good within 600 s" in r.reason and "undecided" in r.reason


def test_abort_restores_the_routing_and_a_manual_change_stops_the_rollout_as_it_is(world):
    controller, _, traffic, _, _ = world
    asyncio.run(controller.start("m", "int8", FAST))
    r = asyncio.run(controller.abort("m"))
    assert r.state == "aborted" and r.reason == "aborted by the user" and traffic.calls[-1][1] == {"baseline": 1.0}
    asyncio.run(controller.start("m", "int8", FAST))
    calls = len(traffic.calls)
    asyncio.run(controller.interrupted("m", "manual traffic change"))
    assert controller.status("m").state == "aborted" and controller.status("m").reason == "manual traffic change"
    assert len(traffic.calls) == calls  # the manual routing stays
    asyncio.run(controller.start("m", "int8", FAST))
    asyncio.run(controller.interrupted("m", "variant 'other' was deleted", "other"))
    assert controller.status("m").active  # another variant's deletion does not concern it


def test_bad_starts_are_refused_with_routing_untouched(world):
    controller, repository, traffic, _, _ = world
    with pytest.raises(NotFound, match="no variant 'nope'"):
        asyncio.run(controller.start("m", "nope", FAST))
    with pytest.raises(InvalidArgument, match="it is the control"):
        asyncio.run(controller.start("m", "baseline", FAST))
    with pytest.raises(NotFound):
        asyncio.run(controller.start("x", "int8", FAST))
    assert traffic.calls == []
    asyncio.run(controller.start("m", "int8", FAST))
    with pytest.raises(FailedPrecondition, match="already has a rollout"):
        asyncio.run(controller.start("m", "int8", FAST))
    asyncio.run(controller.abort("m"))
    with pytest.raises(FailedPrecondition, match="no running rollout"):
        asyncio.run(controller.abort("m"))
    repository.read_only = True
    with pytest.raises(FailedPrecondition, match="read-only"):
        asyncio.run(controller.start("m", "int8", FAST))


def test_a_restart_resumes_the_rollout_at_its_stage(world):
    controller, repository, traffic, stats, clock = world
    asyncio.run(controller.start("m", "int8", replace(FAST, shadow=False)))
    for _ in range(100):
        drive(controller, stats, ticks=1)
        if controller.status("m").weight == 50.0:
            break
    before = controller.status("m")
    assert before.state == "canary" and before.weight == 50.0
    again = RolloutController(repository, traffic, FakeStatistics(seed=1), clock)
    again.resume()
    r = again.status("m")
    assert r.state == "canary" and r.weight == 50.0 and r.history[-1].kind == "resumed"
    drive(again, again.statistics, ticks=100)
    assert again.status("m").state == "promoted"
    assert isinstance(RolloutState.from_dict(repository.infos["m"].rollout), RolloutState)


def test_plans_parse_from_files_and_flags_with_precise_errors():
    plan = plan_from_dict({"preset": "fast", "steps": [5, 20], "gates": {"cost": None, "error": 0.02}})
    assert plan.steps == (5.0, 20.0) and "cost" not in plan.gates and plan.gates["error"] == 0.02
    assert plan.min_requests == PRESETS["fast"].min_requests
    assert plan_from_json("") == PRESETS["default"]
    # alpha split: shadow (agreement, error) + 3 canary stages x (error, p50, p99, accuracy) = 14 tests
    assert PRESETS["default"].alpha_per_test() == pytest.approx(0.05 / 14)
    assert parse_steps("5, 25,50") == [5.0, 25.0, 50.0]
    for bad, message in [
        ({"steps": [25, 5]}, "must increase"),
        ({"steps": [5, 100]}, "out of range"),
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\)"),
        ({"gates": {"speed": 1}}, "unknown gate 'speed'"),
        ({"preset": "yolo"}, "unknown rollout preset"),
        ({"stepz": [1]}, "unknown rollout plan field stepz"),
        ({"gates": {"latency_p50": 0.5}}, "must be >= 1"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            plan_from_dict(bad)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        plan_from_json("{steps: ")
