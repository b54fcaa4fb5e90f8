"""Traffic routing: weighted and sticky splits, policy checks with precise messages, promote / rollback, deletion."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from slimserve.server.errors import FailedPrecondition, InvalidArgument, NotFound
from slimserve.server.inference.router import Router
from slimserve.server.store.traffic import TrafficPolicy, promote, rollback, set_traffic, validate_policy, without_variant

READY = {"baseline", "int8", "pruned"}


def split(policy: TrafficPolicy, n: int = 1000, seed: int = 7) -> Counter:
    router = Router(policy, seed=seed)
    return Counter(router.choose() for _ in range(n))


# ---------------------------------------------------------------------- the router


def test_a_70_30_split_lands_within_5_points_over_1000_requests():
    policy = set_traffic(TrafficPolicy.single(), {"baseline": 70, "int8": 30}, variants_ready=READY)
    counts = split(policy)
    assert set(counts) == {"baseline", "int8"}
    assert abs(counts["baseline"] / 1000 - 0.70) <= 0.05
    assert abs(counts["int8"] / 1000 - 0.30) <= 0.05


def test_zero_weight_and_single_variant_get_nothing_else():
    assert split(TrafficPolicy.single("int8"), 200) == Counter({"int8": 200})
    policy = set_traffic(TrafficPolicy.single(), {"baseline": 1, "int8": 0}, variants_ready=READY)
    assert split(policy, 500) == Counter({"baseline": 500})


def test_seeded_routers_repeat_their_choices():
    policy = TrafficPolicy({"baseline": 0.5, "int8": 0.5})
    assert _choices(policy, 3, 100) == _choices(policy, 3, 100)
    assert _choices(policy, 3, 100) != _choices(policy, 4, 100)


def _choices(policy: TrafficPolicy, seed: int, n: int) -> list[str]:
    router = Router(policy, seed=seed)
    return [router.choose() for _ in range(n)]


def test_a_sticky_value_always_goes_to_the_same_variant():
    policy = TrafficPolicy({"baseline": 0.5, "int8": 0.3, "pruned": 0.2}, sticky_parameter="user_id")
    routers = [Router(policy, seed=s) for s in range(3)]  # other processes, other seeds: same answer
    for user in ("alice", "bob", "carol", "ünïcode", "42"):
        answers = {r.choose(user) for r in routers for _ in range(20)}
        assert len(answers) == 1, user


def test_sticky_values_split_roughly_by_weight():
    policy = TrafficPolicy({"baseline": 0.7, "int8": 0.3}, sticky_parameter="user_id")
    router = Router(policy)
    counts = Counter(router.choose(f"user-{i}") for i in range(5000))
    assert abs(counts["int8"] / 5000 - 0.30) <= 0.03


def test_sticky_assignment_survives_a_restart_and_argument_order():
    a = Router(TrafficPolicy({"baseline": 0.5, "int8": 0.5}))
    b = Router(TrafficPolicy.from_dict(json.loads(json.dumps(TrafficPolicy({"int8": 1, "baseline": 1}).to_dict()))))
    assert [a.choose(f"u{i}") for i in range(200)] == [b.choose(f"u{i}") for i in range(200)]


def test_choose_for_reads_the_sticky_parameter_from_request_parameters():
    router = Router(TrafficPolicy({"baseline": 0.5, "int8": 0.5}, sticky_parameter="user_id"))
    pinned = router.choose("alice")
    assert {router.choose_for({"user_id": "alice", "other": 1}) for _ in range(30)} == {pinned}
    assert {router.choose_for({}) for _ in range(200)} == {"baseline", "int8"}  # no value: weighted random


def test_router_exposes_shadows():
    policy = set_traffic(TrafficPolicy.single(), {"baseline": 1}, shadows=["int8"], variants_ready=READY)
    router = Router(policy)
    assert router.shadows == ("int8",)
    assert {router.choose() for _ in range(100)} == {"baseline"}  # a shadow never answers


# ---------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "weights, shadows, sticky, error, message",
    [
        ({"baseline": 0, "int8": 0}, (), None, InvalidArgument, "weights must sum to a positive number, got baseline=0, int8=0"),
        ({}, (), None, InvalidArgument, "no weights given"),
        ({"baseline": 1, "int8": -1}, (), None, InvalidArgument, "weight of 'int8' must be a number >= 0, got -1"),
        ({"baseline": float("nan")}, (), None, InvalidArgument, "weight of 'baseline' must be a number >= 0, got nan"),
        ({"baseline": 1, "int9": 1}, (), None, NotFound, "model has no variant 'int9' (variants: baseline, int8, pruned)"),
        ({"baseline": 1}, ("int9",), None, NotFound, "model has no variant 'int9'"),
        ({"baseline": 70, "int8": 30}, ("int8",), None, InvalidArgument, "variant 'int8' cannot be both primary (weight 30) and shadow"),
        ({"baseline": 1}, (), "", InvalidArgument, "sticky parameter name is empty"),
        ({"baseline": 1}, (), "user id", InvalidArgument, "sticky parameter 'user id' is not a valid parameter name"),
        ({"baseline": 1}, (), "1user", InvalidArgument, "sticky parameter '1user' is not a valid parameter name"),
    ],
)
def test_invalid_policies_raise_precisely_and_leave_the_current_one(weights, shadows, sticky, error, message):
    current = set_traffic(TrafficPolicy.single(), {"baseline": 80, "int8": 20}, variants_ready=READY)
    before = current.to_dict()
    with pytest.raises(error) as info:
        set_traffic(current, weights, shadows, sticky, variants_ready=READY)
    assert message in info.value.message
    assert current.to_dict() == before


def test_a_variant_that_is_not_ready_is_named_with_its_status():
    with pytest.raises(FailedPrecondition, match="variant 'int8' of model 'digits' is failed, not ready"):
        validate_policy(TrafficPolicy({"int8": 1}), {"baseline"}, model="digits", statuses={"baseline": "ready", "int8": "failed"})


def test_valid_policy_is_normalized_and_keeps_its_options():
    policy = set_traffic(TrafficPolicy.single(), {"baseline": 70, "int8": 30}, ["pruned"], "user_id", variants_ready=READY)
    assert policy.weights == pytest.approx({"baseline": 0.7, "int8": 0.3})
    assert policy.shadows == ("pruned",)
    assert policy.sticky_parameter == "user_id"
    assert policy.previous == TrafficPolicy.single()
    # A shadow may be listed as a primary with weight 0.
    set_traffic(policy, {"baseline": 1, "int8": 0}, ["int8"], variants_ready=READY)


def test_caller_dicts_changing_later_do_not_change_a_policy():
    weights = {"baseline": 1.0}
    policy = TrafficPolicy(weights)
    weights["int8"] = 5.0
    assert policy.weights == {"baseline": 1.0}


# ---------------------------------------------------------------------- promote, rollback, deletion


def test_promote_then_rollback_restores_the_previous_policy():
    split_policy = set_traffic(TrafficPolicy.single(), {"baseline": 70, "int8": 30}, ["pruned"], "user_id", variants_ready=READY)
    promoted = promote(split_policy, "int8", variants_ready=READY)
    assert promoted.weights == {"int8": 1.0}
    assert promoted.shadows == ()
    assert promoted.can_rollback
    restored = rollback(promoted, variants_ready=READY)
    assert (restored.weights, restored.shadows, restored.sticky_parameter) == (
        split_policy.weights,
        split_policy.shadows,
        split_policy.sticky_parameter,
    )
    with pytest.raises(FailedPrecondition, match="nothing to roll back to"):
        rollback(restored)


def test_rollback_with_nothing_before_says_so():
    with pytest.raises(FailedPrecondition, match="nothing to roll back to"):
        rollback(TrafficPolicy.single())


def test_promote_of_an_unknown_variant_raises_and_keeps_the_policy():
    current = TrafficPolicy.single()
    with pytest.raises(NotFound, match="model 'digits' has no variant 'int9'"):
        promote(current, "int9", variants_ready=READY, model="digits")
    assert current == TrafficPolicy.single()


def test_rollback_to_a_variant_that_failed_since_is_refused():
    promoted = promote(set_traffic(TrafficPolicy.single(), {"int8": 1}, variants_ready=READY), "baseline", variants_ready=READY)
    with pytest.raises(NotFound, match="no variant 'int8'"):
        rollback(promoted, variants_ready={"baseline"})


def test_deleting_a_variant_renormalizes_the_others():
    policy = set_traffic(TrafficPolicy.single(), {"baseline": 50, "int8": 30, "pruned": 20}, variants_ready=READY)
    after = without_variant(policy, "int8")
    assert after.weights == pytest.approx({"baseline": 50 / 70, "pruned": 20 / 70})
    assert after.previous == policy.previous  # deletion is not a routing change to roll back


def test_deleting_the_variant_that_held_all_traffic_falls_back_to_baseline():
    policy = promote(set_traffic(TrafficPolicy.single(), {"baseline": 1}, ["pruned"], variants_ready=READY), "int8", variants_ready=READY)
    after = without_variant(policy, "int8")
    assert after.weights == {"baseline": 1.0}
    # The history forgets the deleted variant too, so a rollback cannot route to it.
    assert "int8" not in rollback(after).variants()
    shadowed = set_traffic(TrafficPolicy.single(), {"baseline": 1}, ["int8"], variants_ready=READY)
    assert without_variant(shadowed, "int8").shadows == ()
    with pytest.raises(FailedPrecondition, match="baseline cannot be removed"):
        without_variant(policy, "baseline")


def test_to_dict_from_dict_round_trip_through_json():
    policy = promote(
        set_traffic(TrafficPolicy.single(), {"baseline": 70, "int8": 30}, ["pruned"], "user_id", variants_ready=READY),
        "int8",
        variants_ready=READY,
    )
    data = json.loads(json.dumps(policy.to_dict()))
    assert data["version"] == 1
    assert TrafficPolicy.from_dict(data) == policy
    with pytest.raises(InvalidArgument, match="weight of 'x' must be a number"):
        TrafficPolicy.from_dict({"weights": {"x": "a lot"}})
