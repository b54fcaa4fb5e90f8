"""`slimctl rollout`: the --json record built from the server's message, and flags refused before any call."""

from __future__ import annotations

from typer.testing import CliRunner

from slimserve.client.cli import app
from slimserve.client.records import rollout_dict
from slimserve.server.grpc import converters
from slimserve.server.rollout.plan import RolloutPlan
from slimserve.server.rollout.state import Event, GateResult, RolloutState
from slimserve.server.store.traffic import TrafficPolicy


def test_the_status_record_carries_state_gates_history_and_reason():
    r = RolloutState(
        "digits",
        "int8",
        "baseline",
        RolloutPlan(),
        TrafficPolicy.single(),
        state="rolled_back",
        started_at=10.0,
        finished_at=20.0,
        reason="gate 'error' failed",
        requests={"int8": 40, "baseline": 400},
    )
    r.gates = [GateResult("error", "fail", 0.09, 0.01, "error rate ..."), GateResult("accuracy", "skip", None, 0.01, "no feedback")]
    r.history = [
        Event(10.0, "started", "", 0.0, "rollout"),
        Event(20.0, "rolled_back", "rolled_back", 0.0, "why", "error", 0.09, 0.01, "ev"),
    ]
    record = rollout_dict(converters.rollout_status(r))
    assert record["state"] == "rolled_back" and record["variant"] == "int8" and record["control"] == "baseline"
    assert record["weight"] == 0.0 and record["requests"] == {"int8": 40, "baseline": 400}
    assert record["gates"][0] == {"name": "error", "statistic": 0.09, "threshold": 0.01, "decision": "fail", "evidence": "error rate ..."}
    assert record["gates"][1]["statistic"] is None and record["gates"][1]["decision"] == "skip"
    assert record["history"][0]["time"].startswith("1970-01-01T00:00:10") and record["history"][0]["gate"] is None
    assert record["history"][1]["gate"] == "error" and record["history"][1]["statistic"] == 0.09
    assert record["reason"] == "gate 'error' failed" and record["plan"]["steps"] == [5.0, 25.0, 50.0]


def test_bad_steps_and_a_missing_plan_file_fail_with_their_reason(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["--server", "127.0.0.1:1", "rollout", "start", "m", "v", "--steps", "5,x"])
    assert result.exit_code == 1 and "not comma-separated percents" in result.output
    result = runner.invoke(app, ["--server", "127.0.0.1:1", "rollout", "start", "m", "v", "--plan", str(tmp_path / "no.yaml")])
    assert result.exit_code == 1 and "plan file" in result.output and "does not exist" in result.output
    (tmp_path / "bad.yaml").write_text("steps: [5,\n")
    result = runner.invoke(app, ["--server", "127.0.0.1:1", "rollout", "start", "m", "v", "--plan", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 1 and "plan file" in result.output and "cannot be parsed" in result.output
