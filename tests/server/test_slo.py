"""The SLO policy's checks and steering steps (server/rollout/slo.py; not wired into the server yet): bad input answered as
issue 24 asks, traffic moved step by step to the fastest variant within the drop, shadows paused first, and back with
hysteresis, never flapping."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from slimserve.server.errors import InvalidArgument, NotFound
from slimserve.server.rollout.gates import Arm
from slimserve.server.rollout.slo import CALM, STEP, SloPolicy, SloSteering, VariantProfile, check_policy, predicted_p99_s
from slimserve.server.rollout.slo_controller import SloController, profiles
from slimserve.server.store.manifest import VariantInfo
from slimserve.server.store.traffic import TrafficPolicy

PROFILES = [VariantProfile("fp32", 8.0, 0.0), VariantProfile("int8", 3.0, 0.4), VariantProfile("pruned", 2.0, 3.0)]


def steering(policy: SloPolicy) -> SloSteering:
    checked = check_policy(policy, "m", PROFILES)
    return SloSteering(
        policy, {"fp32": 1.0}, checked.eligible, {p.name: p.drop_pt for p in PROFILES}, {p.name: p.batch1_ms for p in PROFILES}
    )


@pytest.mark.parametrize(
    ("p99", "drop", "match"),
    [(0, 1, "--p99 0 is out of range"), (float("nan"), 1, "--p99"), (20, -1, "--max-drop -1 is out of range"), (20, 100, "--max-drop")],
)
def test_an_objective_or_drop_out_of_range_is_an_invalid_argument(p99, drop, match):
    with pytest.raises(InvalidArgument, match=match):
        SloPolicy(p99, drop)


def test_no_faster_variant_within_the_drop_is_refused_listing_each_variants_drop():
    with pytest.raises(InvalidArgument) as e:
        check_policy(SloPolicy(20, 0.1), "m", PROFILES)
    assert "no variant faster than the baseline gives up at most 0.1" in e.value.message
    assert "int8 (+0.40 pt, 3 ms)" in e.value.message and "pruned (+3.00 pt, 2 ms)" in e.value.message


def test_an_objective_below_the_fastest_batch_1_latency_is_accepted_with_a_warning_and_a_rollout_makes_it_wait():
    checked = check_policy(SloPolicy(2.5, 1.0), "m", PROFILES, rollout_variant="int8")
    assert checked.eligible == ("int8", "fp32")  # pruned gives up 3 points: not eligible
    assert len(checked.warnings) == 1 and "('int8') answers at batch 1 (3 ms)" in checked.warnings[0]
    assert "rollout of 'int8' is running" in checked.waiting and "the SLO waits" in checked.waiting
    assert check_policy(SloPolicy(50, 1.0), "m", PROFILES).warnings == ()


def test_a_breach_pauses_shadows_first_then_moves_a_step_at_a_time_to_the_fastest_eligible_variant():
    s = steering(SloPolicy(20, 1.0))
    first = s.look(60.0, has_shadows=True)
    assert first.pause_shadows and first.weights == {"fp32": 1.0} and "shadows paused first" in first.reason
    shares = []
    for _ in range(5):
        shift = s.look(60.0, has_shadows=True)
        shares.append(shift.weights.get("int8", 0.0))
        assert shift.cost_pt <= 1.0  # the expected accuracy cost never exceeds --max-drop
    assert shares[:4] == pytest.approx([STEP * k for k in range(1, 5)])
    assert shift.saturated and "refused" in shift.reason  # all on int8 and still breaking
    assert s.cost(s.weights) == pytest.approx(0.4)


def test_traffic_returns_only_after_calm_looks_under_the_lower_threshold_and_does_not_flap():
    s = steering(SloPolicy(20, 1.0))
    s.look(60.0)
    s.look(60.0)
    assert s.weights == pytest.approx({"fp32": 1 - 2 * STEP, "int8": 2 * STEP})
    for _ in range(10):  # between 0.6x and 1x the objective: hold
        assert s.look(15.0) is None
    for _ in range(CALM - 1):  # under 0.6x, but not long enough yet
        assert s.look(5.0) is None
    assert s.look(18.0) is None  # back in the band: the count restarts
    for _ in range(CALM - 1):
        assert s.look(5.0) is None
    back = s.look(5.0)
    assert back is not None and back.weights == pytest.approx({"fp32": 1 - STEP, "int8": STEP}) and "back from 'int8'" in back.reason
    shifts = [s.look(5.0) for _ in range(CALM * 3)]
    assert [x for x in shifts if x is not None][-1].weights == pytest.approx({"fp32": 1.0})
    assert s.look(5.0) is None  # at the original split nothing moves


# ---------------------------------------------------------------------------------------------- the loop in the server


class _Info:
    def __init__(self) -> None:
        self.variants = {
            "fp32": VariantInfo("fp32", "", "", "onnx", "onnx", evaluation={"latency_p50_ms": 8.0, "accuracy": 0.980}),
            "int8": VariantInfo("int8", "", "", "onnx", "onnx", evaluation={"latency_p50_ms": 3.0, "accuracy": 0.976}),
            "pruned": VariantInfo("pruned", "", "", "onnx", "onnx", evaluation={"latency_p50_ms": 2.0, "accuracy": 0.95}),
        }
        self.traffic = TrafficPolicy({"fp32": 1.0}, ("pruned",))
        self.slo = None

    @property
    def default_variant(self) -> str:
        return max(self.traffic.weights, key=self.traffic.weights.get)


def test_an_embedding_models_variants_are_judged_by_their_measured_quality_drop():
    """No labels, so no accuracy: the optimizer's quality drop (points of (1 - mean cosine) x 100) is each variant's drop;
    one with neither is never eligible."""
    info = _Info()
    info.variants = {
        "fp32": VariantInfo("fp32", "", "", "onnx", "onnx", evaluation={"latency_p50_ms": 30.0, "quality_metric": "cosine"}),
        "int8": VariantInfo("int8", "", "", "onnx", "onnx", evaluation={"latency_p50_ms": 15.0, "quality_drop": 0.7}),
        "pruned": VariantInfo("pruned", "", "", "onnx", "onnx", evaluation={"latency_p50_ms": 9.0}),
    }
    found, base = profiles(info)
    assert base == "fp32" and found == [VariantProfile("fp32", 30.0, 0.0), VariantProfile("int8", 15.0, 0.7)]


class _World:
    """Repository, traffic and statistics of one model 'm', in memory."""

    def __init__(self) -> None:
        self.info = _Info()
        self.latency: dict[str, list[float]] = {v: [] for v in self.info.variants}
        self.routed: list[tuple[dict, list]] = []
        self.running: dict = {}
        self.requests: dict[str, int] = {}  # variant -> requests answered or not (Arm.requests)
        self.shed: dict[str, int] = {}  # variant -> requests its queue refused or dropped at their deadline

    def check_writable(self) -> None:
        pass

    def get(self, name: str):
        if name != "m":
            raise NotFound(f"Request for unknown model: '{name}' is not registered")
        return self.info

    def names(self):
        return ["m"]

    def update(self, name, change):
        change(self.get(name))

    async def set_traffic(self, model, weights, shadows, sticky, *, automatic=False):
        assert automatic
        self.info.traffic = TrafficPolicy(weights, tuple(shadows), sticky)
        self.routed.append((dict(weights), list(shadows)))

    async def refresh(self, model, variants):
        pass

    def arm(self, model, variant):
        return Arm(requests=self.requests.get(variant, 0), latency_mark=len(self.latency[variant]), shed=self.shed.get(variant, 0))

    def latencies_since(self, model, variant, mark):
        return np.array(self.latency[variant][mark:])

    def serve(self, ms: float, n: int = 100) -> None:
        for v, w in self.info.traffic.weights.items():
            self.latency[v].extend([ms / 1000] * round(n * w))


def test_the_server_loop_steers_a_models_split_records_each_shift_and_waits_for_a_rollout():
    world = _World()
    shifts = []
    slo = SloController(world, world, world, world, clock=lambda: 0.0, on_shift=lambda *a: shifts.append(a))
    with pytest.raises(InvalidArgument, match=r"int8 \(\+0\.40 pt"):
        slo.set("m", 20, 0.2)
    assert world.info.slo is None  # refused: nothing stored
    state = slo.set("m", 20, 1.0)
    assert state.state == "active" and state.eligible == ["int8", "fp32"] and world.info.slo["p99_ms"] == 20
    assert state.drops["int8"] == pytest.approx(0.4)

    async def run():
        await slo.tick()  # the first look only sets the marks
        world.serve(60)
        await slo.tick()
        assert world.routed[-1] == ({"fp32": 1.0}, [])  # shadows paused first
        world.serve(60)
        await slo.tick()
        assert world.routed[-1] == ({"fp32": 0.75, "int8": 0.25}, [])
        world.running["m"] = SimpleNamespace(variant="int8")
        world.serve(60)
        await slo.tick()
        assert slo.status("m").state == "waiting" and "rollout of 'int8' is running" in slo.status("m").message
        assert len(world.routed) == 2  # the rollout's split is left alone
        del world.running["m"]
        cleared = await slo.clear("m")
        assert cleared.state == "off" and world.info.slo is None

    asyncio.run(run())
    assert shifts == [("m", "int8", "pause_shadows"), ("m", "int8", "toward_fast")]
    kinds = [e["kind"] for e in state.history]
    assert kinds[:3] == ["set", "pause_shadows", "toward_fast"] and "waiting" in kinds


def test_slo_over_grpc_refuses_a_model_without_a_faster_variant_and_says_when_there_is_none(client, digits):
    from slimserve.client.client import SlimServeClientError

    client.register("digits", digits.onnx, data=digits.data)
    with pytest.raises(SlimServeClientError) as e:
        client.slo_status("digits")
    assert e.value.code == "NOT_FOUND" and "slimctl slo digits --p99 MS" in e.value.message
    with pytest.raises(SlimServeClientError) as e:
        client.slo_set("digits", 0, 1)
    assert e.value.code == "INVALID_ARGUMENT" and "--p99 0" in e.value.message
    with pytest.raises(SlimServeClientError) as e:
        client.slo_set("digits", 20, 1)
    assert e.value.code == "INVALID_ARGUMENT"
    # refused either way: the baseline alone (once its evaluation ran) is not faster than itself; before it ran, nothing is measured
    assert "no variant faster than the baseline" in e.value.message or "no variants measured" in e.value.message


def test_traffic_does_not_go_back_while_the_slow_variant_could_not_carry_its_share_of_the_load():
    s = steering(SloPolicy(100, 1.0))
    s.look(300.0)
    s.look(300.0)
    slow = {"fp32": 0.017, "int8": 0.003}  # seconds of compute per request
    for _ in range(CALM * 3):  # 90 requests/s: back to 75% fp32 would keep it 1.15 busy
        assert s.look(5.0, rate_rps=90.0, service_s=slow) is None
    assert s.weights == pytest.approx({"fp32": 0.5, "int8": 0.5})
    assert predicted_p99_s(0.017, 0.75 * 30 * 0.017) == pytest.approx(0.017 * (1 + 2.3026 * 0.3825 / 0.6175), rel=1e-3)
    for _ in range(CALM - 1):
        assert s.look(5.0, rate_rps=30.0, service_s=slow) is None
    assert s.look(5.0, rate_rps=30.0, service_s=slow).weights == pytest.approx({"fp32": 0.75, "int8": 0.25})  # p99 41 ms < 60


def test_a_breach_right_after_a_step_back_doubles_the_calm_the_next_one_needs():
    s = steering(SloPolicy(100, 1.0))
    s.look(300.0)
    s.look(300.0)  # 50% on int8
    looks = 0
    while s.look(5.0) is None:
        looks += 1
    assert looks == CALM - 1 and s.weights == pytest.approx({"fp32": 0.75, "int8": 0.25})
    s.look(300.0)  # the load was still there
    assert s.calm_needed == 2 * CALM and s.weights == pytest.approx({"fp32": 0.5, "int8": 0.5})
    looks = 0
    while s.look(5.0) is None:
        looks += 1
    assert looks == 2 * CALM - 1


# ---------------------------------------------------------------- issue 24, finished: events, predicted wait, manual change


def test_every_shift_is_an_event_on_the_watch_stream_with_its_reason_and_expected_cost():
    world = _World()
    slo = SloController(world, world, world, world, clock=lambda: 0.0)
    slo.set("m", 20, 1.0)

    async def run():
        seen = []

        async def follow():
            async for state in slo.watch("m"):
                seen.append(dict(state.history[-1]))

        task = asyncio.get_running_loop().create_task(follow())
        await asyncio.sleep(0)
        await slo.tick()
        for _ in range(2):
            world.serve(60)
            await slo.tick()
        await asyncio.sleep(0)
        await slo.clear("m")
        await asyncio.wait_for(task, 1.0)  # the stream ends once the objective is removed
        return seen

    seen = asyncio.run(run())
    assert [e["kind"] for e in seen] == ["set", "pause_shadows", "toward_fast", "off"]
    shift = seen[2]
    assert "p99 60 ms > objective 20 ms: 25% of traffic from 'fp32' to 'int8'" in shift["reason"]
    assert shift["cost_pt"] == pytest.approx(0.25 * 0.4) and shift["weights"] == {"fp32": 0.75, "int8": 0.25}


def test_the_rollout_status_carries_the_objectives_shifts_and_the_cli_shows_them_without_a_rollout(monkeypatch):
    from typer.testing import CliRunner

    from slimserve.client import cli_rollout
    from slimserve.client.cli import app
    from slimserve.client.client import SlimServeClientError
    from slimserve.client.records import rollout_dict
    from slimserve.server.grpc import converters
    from slimserve.server.rollout.plan import RolloutPlan
    from slimserve.server.rollout.state import RolloutState

    world = _World()
    slo = SloController(world, world, world, world, clock=lambda: 0.0)
    slo.set("m", 20, 1.0)

    async def shift():
        await slo.tick()
        for _ in range(2):
            world.serve(60)
            await slo.tick()

    asyncio.run(shift())
    r = RolloutState("m", "int8", "fp32", RolloutPlan(), TrafficPolicy.single(), state="promoted", started_at=1.0, finished_at=2.0)
    record = rollout_dict(converters.rollout_status(r, slo.status("m")))
    assert [e["kind"] for e in record["slo"]["history"]] == ["set", "pause_shadows", "toward_fast"]
    assert record["slo"]["cost_pt"] == pytest.approx(0.1) and rollout_dict(converters.rollout_status(r))["slo"] is None

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def rollout_status(self, name):
            raise SlimServeClientError("NOT_FOUND", f"model '{name}' has no rollout; start one with ...")

        def slo_status(self, name):
            return record["slo"]

    monkeypatch.setattr(cli_rollout, "connect", Client)
    result = CliRunner().invoke(app, ["rollout", "status", "m"])
    assert result.exit_code == 0, result.output
    assert "model m has no rollout" in result.output and "toward_fast" in result.output
    assert "25% of traffic from 'fp32' to 'int8'" in result.output and "[cost 0.10 pt]" in result.output


def test_the_queues_predicted_wait_shifts_traffic_before_any_p99_is_known():
    world = _World()
    waits = {"fp32": 0.005, "int8": None}
    slo = SloController(world, world, world, world, clock=lambda: 0.0, waits=lambda model: waits)
    slo.set("m", 20, 1.0)

    async def run():
        await slo.tick()
        await slo.tick()  # 5 ms predicted, no answers yet: nothing to do
        assert world.routed == []
        waits["fp32"] = 0.080  # a spike queues up: not one request answered since
        await slo.tick()
        await slo.tick()

    asyncio.run(run())
    assert world.routed == [({"fp32": 1.0}, []), ({"fp32": 0.75, "int8": 0.25}, [])]
    reason = slo.status("m").history[-1]["reason"]
    assert "the queue's predicted wait 80 ms > objective 20 ms: 25% of traffic from 'fp32' to 'int8'" in reason


def test_a_manual_traffic_change_makes_the_objective_step_aside_and_resume_from_the_new_split():
    world = _World()
    slo = SloController(world, world, world, world, clock=lambda: 0.0)
    slo.set("m", 20, 1.0)

    async def run():
        await slo.tick()
        for _ in range(2):
            world.serve(60)
            await slo.tick()
        assert world.info.traffic.weights == {"fp32": 0.75, "int8": 0.25}
        world.info.traffic = TrafficPolicy({"fp32": 0.5, "int8": 0.5})  # `slimctl traffic` by hand
        await slo.manual_change("m", "manual traffic change")
        world.serve(60)
        await slo.tick()
        state = slo.status("m")
        aside = [e for e in state.history if e["kind"] == "stepped_aside"]
        assert len(aside) == 1 and "manual traffic change: the objective stepped aside" in aside[0]["reason"]
        assert "fp32 50%, int8 50%" in aside[0]["reason"] and state.original == {"fp32": 0.5, "int8": 0.5}
        assert world.routed[-1] == ({"fp32": 0.25, "int8": 0.75}, [])  # the next step starts from the new split
        # a change it was not told of (another writer, a restored manifest) is found by the split itself
        world.info.traffic = TrafficPolicy({"fp32": 1.0})
        world.serve(5)
        await slo.tick()
        assert slo.status("m").history[-1]["kind"] == "stepped_aside"
        assert "the routing changed outside the objective" in slo.status("m").history[-1]["reason"]
        cleared = await slo.clear("m")
        return cleared

    cleared = asyncio.run(run())
    assert cleared.weights == {"fp32": 1.0} and world.info.traffic.weights == {"fp32": 1.0}  # --clear gives the new split back


def test_the_rollout_servicer_streams_the_objectives_events_and_attaches_them_to_the_rollouts_status():
    from slimserve.protos import slimserve_pb2 as spb
    from slimserve.server.grpc.servicers.rollout import RolloutServicer
    from slimserve.server.rollout.plan import RolloutPlan
    from slimserve.server.rollout.state import RolloutState

    world = _World()
    slo = SloController(world, world, world, world, clock=lambda: 0.0)
    slo.set("m", 20, 1.0)
    done = RolloutState("m", "int8", "fp32", RolloutPlan(), TrafficPolicy.single(), state="promoted", started_at=1.0, finished_at=2.0)
    rollouts = SimpleNamespace(status=lambda model: done)
    servicer = RolloutServicer(rollouts, slo)
    request = spb.RolloutRequest(model="m")

    async def run():
        kinds = []

        async def follow():
            async for status in servicer.WatchSlo(request, None):
                kinds.append(status.history[-1].kind)

        task = asyncio.get_running_loop().create_task(follow())
        await asyncio.sleep(0)
        await slo.tick()
        for _ in range(2):
            world.serve(60)
            await slo.tick()
        status = await servicer.Status(request, None)
        await slo.clear("m")
        await asyncio.wait_for(task, 1.0)
        return kinds, status

    kinds, status = asyncio.run(run())
    assert kinds == ["set", "pause_shadows", "toward_fast", "off"]
    assert status.HasField("slo") and [e.kind for e in status.slo.history][-1] == "toward_fast"
    assert status.slo.history[-1].cost_pt == pytest.approx(0.1)


def test_slo_watch_prints_each_new_event_once_until_the_objective_is_removed(monkeypatch):
    from typer.testing import CliRunner

    from slimserve.client import cli_rollout
    from slimserve.client.cli import app

    def event(second, kind, reason, cost=0.0):
        return {"time": f"2026-01-01T00:00:0{second}Z", "kind": kind, "reason": reason, "weights": {}, "cost_pt": cost}

    first = [event(0, "set", "holding p99 <= 20 ms")]
    record = {
        "model": "m", "p99_ms": 20.0, "max_drop_pt": 1.0, "state": "active", "message": "holding", "warnings": [],
        "eligible": ["int8", "fp32"], "drops": {"int8": 0.4}, "weights": {"fp32": 1.0}, "original": {"fp32": 1.0},
        "cost_pt": 0.0, "history": first,
    }  # fmt: skip
    stream = [
        dict(record, history=first),  # the state now, as the first message: already shown
        dict(record, history=[*first, event(1, "toward_fast", "p99 60 ms > objective 20 ms: 25% ...", 0.1)]),
        dict(record, state="off", history=[*first, event(1, "toward_fast", "p99 60 ms > ...", 0.1), event(2, "off", "removed")]),
    ]
    stream[2]["history"][1] = stream[1]["history"][1]

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def slo_status(self, name):
            return record

        def slo_watch(self, name):
            yield from stream

    monkeypatch.setattr(cli_rollout, "connect", Client)
    result = CliRunner().invoke(app, ["slo", "m", "--watch"])
    assert result.exit_code == 0, result.output
    assert result.output.count("holding p99 <= 20 ms") == 1 and result.output.count("toward_fast") == 1
    assert "[cost 0.10 pt]" in result.output and result.output.rstrip().endswith("removed [cost 0.00 pt]")


def test_with_prometheus_the_objective_sees_every_replicas_latency_not_only_the_writers():
    from slimserve.server.rollout.prometheus import PrometheusStatistics

    bounds = ("0.005", "0.01", "0.1", "+Inf")
    # cumulative bucket counts per replica and variant; 'a' is the writer (fast), 'b' a replica under load (slow)
    buckets = {"a": {"fp32": [0, 0, 0, 0], "int8": [0, 0, 0, 0]}, "b": {"fp32": [0, 0, 0, 0], "int8": [0, 0, 0, 0]}}

    def query(url: str, q: str, timeout_s: float) -> list[dict]:
        if "bucket" not in q:
            return []
        return [
            {"metric": {"instance": r, "model": "m", "variant": v, "le": le}, "value": [0, str(n)]}
            for r, variants in buckets.items()
            for v, counts in variants.items()
            for le, n in zip(bounds, counts)
        ]

    world = _World()
    slo = SloController(world, world, PrometheusStatistics("http://prom:9090", query=query), world, clock=lambda: 0.0)
    slo.set("m", 20, 1.0)

    async def run():
        await slo.tick()  # the first look sets the marks
        buckets["a"]["fp32"] = [100, 100, 100, 100]  # the writer's 100 answers: all under 5 ms
        buckets["b"]["fp32"] = [0, 0, 100, 100]  # the replica's 100: 10-100 ms
        await slo.tick()

    asyncio.run(run())
    state = slo.status("m")
    assert state.last_p99_ms is not None and state.last_p99_ms > 20  # the replica's slow half is in the p99
    # it acts on it: the first step, shadows paused (without the replica, the writer's own p99 is under 5 ms)
    assert world.routed == [({"fp32": 1.0}, [])] and "> objective 20 ms: shadows paused first" in state.history[-1]["reason"]


def test_the_controllers_periodic_loop_goes_on_past_a_failing_look_and_stops():
    from slimserve.server.rollout.periodic import Periodic

    class Looker(Periodic):
        default_interval_s = 0.005

        def __init__(self) -> None:
            self.looks = 0

        async def tick(self) -> None:
            self.looks += 1
            if self.looks == 1:
                raise RuntimeError("one bad look")

    async def run():
        looker = Looker()
        with pytest.raises(ValueError, match="interval > 0"):
            looker.start_ticking(0)
        looker.start_ticking()
        for _ in range(400):
            await asyncio.sleep(0.005)
            if looker.looks >= 3:
                break
        await looker.stop()
        stopped = looker.looks
        await asyncio.sleep(0.03)
        return looker.looks, stopped

    looks, stopped = asyncio.run(run())
    assert looks >= 3 and looks == stopped  # went on after the failing first look; none after stop


def test_requests_shed_by_the_queue_break_the_objective_though_the_answered_ones_are_fast():
    world = _World()
    slo = SloController(world, world, world, world, clock=lambda: 0.0)
    slo.set("m", 20, 1.0)

    async def run():
        await slo.tick()  # the first look sets the marks
        world.requests["fp32"], world.shed["fp32"] = 100, 1  # 1% shed: within what a p99 allows
        world.serve(5, 99)
        await slo.tick()
        assert world.routed == []
        world.requests["fp32"], world.shed["fp32"] = 200, 11  # 10% of this look's requests never answered
        world.serve(5, 90)  # those answered were fast
        await slo.tick()

    asyncio.run(run())
    assert world.routed == [({"fp32": 1.0}, [])]  # it acts: the first step, shadows paused
    assert "10.0% of requests shed (refused or dropped at their deadline) > objective 20 ms" in slo.status("m").history[-1]["reason"]
