"""bench/bench_rollout.py's comparison methods on clear cases: the fixed-sample intervals decide as the gates' rule says,
the fixed horizon looks once, and a rollout of a disagreeing variant is rolled back by every method."""

from __future__ import annotations

import numpy as np

from bench.bench_rollout import METHODS, PLAN, SCENARIOS, Behaviour, fixed_horizon_judge, fixed_judge, horizon, one_rollout, summary, wilson
from slimserve.server.rollout.gates import Arm


def test_fixed_sample_gates_pass_an_equal_arm_fail_a_worse_one_and_wait_while_unsure():
    lat = np.random.default_rng(0).lognormal(-5, 0.5, 20000)
    equal = Arm(requests=20000, errors=200, device_seconds=1.0)
    worse = Arm(requests=20000, errors=1000, device_seconds=1.0)
    few = Arm(requests=50, errors=1, device_seconds=0.01)
    decide = {g.name: g.decision for g in fixed_judge(PLAN, "canary", equal, equal, lat, lat)}
    assert decide == {"error": "pass", "latency_p50": "pass", "latency_p99": "pass", "cost": "pass"}
    assert {g.name: g.decision for g in fixed_judge(PLAN, "canary", worse, equal, lat, lat)}["error"] == "fail"
    assert {g.name: g.decision for g in fixed_judge(PLAN, "canary", few, few, lat[:50], lat[:50])}["latency_p99"] == "continue"
    assert {g.name: g.decision for g in fixed_judge(PLAN, "canary", equal, equal, lat * 2, lat)}["latency_p50"] == "fail"
    once = fixed_horizon_judge(horizon(PLAN))
    assert {g.decision for g in once(PLAN, "canary", few, few, lat[:50], lat[:50])} == {"continue"}  # before its horizon
    assert {g.decision for g in once(PLAN, "shadow", Arm(mirrored=5000, agreed=4900), equal, lat, lat)} >= {
        "fail"
    }  # 98% is not shown >= 98%


def test_a_disagreeing_variant_is_rolled_back_by_every_method_and_an_interval_says_how_sure():
    canary, should = SCENARIOS["worse_accuracy"]
    assert not should and canary == Behaviour(agreement=0.97)
    for method in METHODS:
        promoted, requests = one_rollout(method, canary, seed=1, rps=100, interval_s=30)
        assert not promoted and 0 < requests < 100_000, method
    assert wilson(0, 200)[1] < 0.02 and wilson(190, 200)[0] > 0.9


def test_the_json_summary_has_one_object_per_scenario_and_method_with_the_fixed_horizon_beside_it():
    done = {
        ("sprt", "equal", False): [(True, 50_000), (True, 60_000)],
        ("fixed horizon", "equal", False): [(True, 100_000), (False, 110_000)],
        ("sprt", "equal", True): [(True, 1)],  # the single plan's rows are not in the list
    }
    rows = {r["method"]: r for r in summary(done)}
    assert set(rows) == {"sprt", "fixed horizon"}
    sprt = rows["sprt"]
    assert sprt == {
        "scenario": "equal",
        "method": "sprt",
        "default": True,
        "runs": 2,
        "promoted_fraction": 1.0,
        "median_requests": 55_000.0,
        "mean_requests": 55_000.0,
        "fixed_horizon_requests": 105_000.0,
    }
    assert rows["fixed horizon"]["promoted_fraction"] == 0.5 and not rows["fixed horizon"]["default"]
