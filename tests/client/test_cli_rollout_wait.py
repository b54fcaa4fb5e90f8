"""`slimctl rollout start ... --wait` against a server that ticks by itself while traffic flows: a live line per change,
exit 0 when promoted, 1 with the reason otherwise; and `--recipe` optimizes first, then rolls out what it made."""

from __future__ import annotations

import json
import threading

import pytest
from typer.testing import CliRunner

from slimserve.client.cli import app
from slimserve.client.client import SlimServeClient
from tests.server.test_ab import permuted_classes

pytestmark = pytest.mark.slow  # an optimizer job and two rollouts driven by real traffic: ~20 s

# Gates a copy passes quickly even on a loaded machine (the preset's p99, accuracy and cost gates off).
PLAN = {
    "steps": [50],
    "min_requests": 60,
    "max_stage_s": 600,
    "gates": {"error": 0.05, "agreement": 0.9, "latency_p50": 3.0, "latency_p99": None, "accuracy": None, "cost": None},
}


class Traffic:
    """Requests to the model from a thread until stopped, so that the rollout under --wait has something to judge."""

    def __init__(self, address: str, digits) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(address, digits), daemon=True)

    def _run(self, address: str, digits) -> None:
        with SlimServeClient(address) as c:
            i = 0
            while not self.stop.is_set():
                c.infer("digits", {"x": digits.x_test[i % 300 : i % 300 + 1]})
                i += 1

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def ticking(server_factory, digits, tmp_path):
    server = server_factory(rollout_interval_s=0.2)
    with SlimServeClient(server.address) as client:
        client.register("digits", digits.onnx, data=digits.data)
    server.add_variant("digits", "wrong", permuted_classes(digits.onnx, tmp_path / "wrong.onnx"))
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    return server, tmp_path / "plan.json"


def test_wait_follows_live_and_exits_0_when_promoted_1_with_the_reason_when_rolled_back(ticking, digits):
    server, plan = ticking
    runner = CliRunner()
    with Traffic(server.address, digits):
        # --recipe: the optimizer job makes graph-ort, then the rollout of it starts and is followed to its end
        result = runner.invoke(
            app, ["--server", server.address, "rollout", "start", "digits", "--recipe", "graph-ort", "--plan", str(plan), "--wait"]
        )
        assert result.exit_code == 0, result.output
        assert "optimizing digits with graph-ort" in result.output and "variant 'graph-ort' is measured and serving" in result.output
        lines = [line.split()[0] for line in result.output.splitlines() if line.startswith(("shadow ", "canary ", "promoted "))]
        assert lines[0] == "shadow" and "canary" in lines and lines[-1] == "promoted"  # one live line per change
        assert "rollout of graph-ort on digits against baseline: promoted" in result.output

        with SlimServeClient(server.address) as c:
            assert c.traffic("digits")["weights"] == {"graph-ort": 1.0}
        result = runner.invoke(app, ["--server", server.address, "rollout", "start", "digits", "wrong", "--plan", str(plan), "--wait"])
    assert result.exit_code == 1, result.output
    assert "slimctl: rollout rolled_back: gate 'agreement' failed at the shadow stage" in result.output


def test_recipe_and_variant_together_or_neither_are_refused_before_any_call():
    runner = CliRunner()
    for args in (["m"], ["m", "v", "--recipe", "graph-ort"]):
        result = runner.invoke(app, ["--server", "127.0.0.1:1", "rollout", "start", *args])
        assert result.exit_code == 1 and "give the VARIANT to roll out, or --recipe R" in result.output


def test_recipe_is_refused_before_optimizing_while_a_rollout_runs(ticking):
    server, plan = ticking
    with SlimServeClient(server.address) as c:
        c.rollout_start("digits", "wrong", plan)
        result = CliRunner().invoke(app, ["--server", server.address, "rollout", "start", "digits", "--recipe", "graph-ort"])
        assert result.exit_code == 1 and "already has a rollout of 'wrong' (shadow)" in result.output
        assert c.jobs("digits") == []  # no optimizer job was started
