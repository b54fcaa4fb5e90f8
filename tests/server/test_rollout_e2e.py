"""Rollouts through a running server: a good copy of the digits CNN is promoted, one that answers wrong is rolled back
by the shadow agreement gate, a manual traffic change aborts, a restart resumes; requests and ticks are driven directly."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from slimserve.client.cli import app
from slimserve.client.client import SlimServeClient, SlimServeClientError
from tests.server.test_ab import _drain, permuted_classes

PLAN = {
    "steps": [50],
    "min_requests": 100,
    "gates": {"error": 0.05, "latency_p50": 3.0, "latency_p99": None, "accuracy": 0.05, "agreement": 0.9, "cost": 5.0},
}


@pytest.fixture
def rolled(server_factory, digits, tmp_path):
    server = server_factory(rollout_interval_s=3600.0)  # the test ticks
    client = SlimServeClient(server.address)
    client.register("digits", digits.onnx, data=digits.data)
    server.add_variant("digits", "good", digits.onnx)
    server.add_variant("digits", "wrong", permuted_classes(digits.onnx, tmp_path / "wrong.onnx"))
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    yield server, client, tmp_path / "plan.json"
    client.close()


def drive(server, client, digits, rounds: int = 60, per_round: int = 40) -> dict:
    """Requests, then one look, until the rollout ends."""
    for i in range(rounds):
        for j in range(per_round):
            client.infer("digits", {"x": digits.x_test[(i * per_round + j) % 300 : (i * per_round + j) % 300 + 1]})
        server.call(_drain(server))
        server.call(server.server.rollouts.tick())
        status = client.rollout_status("digits")
        if status["state"] not in ("shadow", "canary"):
            return status
    return status


def test_a_good_variant_is_promoted_and_a_wrong_one_rolled_back_by_the_gate_that_caught_it(rolled, digits):
    server, client, plan = rolled
    started = client.rollout_start("digits", "good", plan)
    assert started["state"] == "shadow" and started["control"] == "baseline"
    assert client.traffic("digits")["shadows"] == ["good"]
    done = drive(server, client, digits)
    assert done["state"] == "promoted", done["reason"]
    assert [e["kind"] for e in done["history"]] == ["started", "stage", "stage", "promoted"]
    assert client.traffic("digits")["weights"] == {"good": 1.0}

    client.traffic("digits", {"baseline": 1})  # back to the baseline for the next rollout
    client.rollout_start("digits", "wrong", plan)
    done = drive(server, client, digits)
    assert done["state"] == "rolled_back" and "gate 'agreement' failed at the shadow stage" in done["reason"]
    last = done["history"][-1]
    assert last["gate"] == "agreement" and last["statistic"] < 0.5 and last["threshold"] == 0.9
    policy = client.traffic("digits")
    assert policy["weights"] == {"baseline": 1.0} and policy["shadows"] == []

    result = CliRunner().invoke(app, ["--server", server.address, "rollout", "status", "digits", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert {"state", "variant", "control", "weight", "requests", "gates", "history", "reason"} <= set(record)
    assert record["state"] == "rolled_back" and record["variant"] == "wrong"
    assert {g["name"] for g in record["gates"]} == {"agreement", "error"}
    assert all({"name", "statistic", "threshold", "decision"} <= set(g) for g in record["gates"])


def test_bad_starts_are_refused_precisely_and_a_manual_change_aborts(rolled):
    _server, client, plan = rolled
    for args, code, message in [
        (("digits", "nope"), "NOT_FOUND", "no variant 'nope'"),
        (("digits", "baseline"), "INVALID_ARGUMENT", "it is the control"),
        (("ghost", "good"), "NOT_FOUND", "ghost"),
    ]:
        with pytest.raises(SlimServeClientError, match=message) as e:
            client.rollout_start(*args)
        assert e.value.code == code
    with pytest.raises(SlimServeClientError, match="must increase") as e:
        client.rollout_start("digits", "good", steps=[50, 5])
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(SlimServeClientError, match=r"alpha must be in \(0, 1\)"):
        client.rollout_start("digits", "good", alpha=2.0)
    assert client.traffic("digits")["weights"] == {"baseline": 1.0} and client.traffic("digits")["shadows"] == []
    client.rollout_start("digits", "good", plan)
    with pytest.raises(SlimServeClientError, match="already has a rollout") as e:
        client.rollout_start("digits", "wrong", plan)
    assert e.value.code == "FAILED_PRECONDITION"
    client.traffic("digits", {"baseline": 70, "good": 30})
    status = client.rollout_status("digits")
    assert status["state"] == "aborted" and status["reason"] == "manual traffic change"
    assert client.traffic("digits")["weights"] == pytest.approx({"baseline": 0.7, "good": 0.3})  # the manual change stays


def test_a_restart_resumes_a_running_rollout_and_abort_restores_the_traffic(rolled, server_factory):
    server, client, plan = rolled
    client.rollout_start("digits", "good", plan, steps=[20, 60])
    repository = server.settings.repository
    client.close()
    server.stop()
    again = server_factory(repository, rollout_interval_s=3600.0)
    with SlimServeClient(again.address) as c:
        status = c.rollout_status("digits")
        assert status["state"] == "shadow" and status["history"][-1]["kind"] == "resumed"
        assert status["plan"]["steps"] == [20.0, 60.0]
        result = CliRunner().invoke(app, ["--server", again.address, "rollout", "abort", "digits"])
        assert result.exit_code == 0, result.output
        assert "aborted by the user" in result.output
        assert "statistics from: process (this server's own traffic)" in result.output  # no --prometheus-url
        assert c.traffic("digits")["shadows"] == [] and c.traffic("digits")["weights"] == {"baseline": 1.0}
