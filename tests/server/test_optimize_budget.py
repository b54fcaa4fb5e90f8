"""Optimization jobs held to an accuracy budget: the setting a search kept in the variant's record and report, a variant
that cannot meet the budget refused with the best it reached and nothing registered, or kept when asked (--keep-over-budget)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from slimserve.client.cli import app
from slimserve.client.client import SlimServeClientError
from tests.optimizer.test_budget import NoisePass, W, X
from tests.optimizer.tiny_models import add_pass, dense_onnx, save_npz


@pytest.fixture
def noisy(client, tmp_path, monkeypatch):
    """A classifier registered with evaluation data, the test-noise pass (in-process server), and a recipe file of it."""
    add_pass(monkeypatch, NoisePass, "test-noise")
    labels = (np.maximum(X @ W[0], 0) @ W[1]).argmax(1)
    client.register("m", dense_onnx(tmp_path / "m.onnx", W, output="logits"), data=save_npz(tmp_path / "eval.npz", x=X, labels=labels))

    def recipe(**budget) -> str:
        path = tmp_path / "noise.json"
        path.write_text(json.dumps({"version": 1, "name": "noise", "passes": [{"pass": "test-noise", "budget": budget}]}))
        return str(path)

    return client, recipe


def test_a_searched_variant_says_the_setting_it_kept_and_the_search_cost(noisy):
    client, recipe = noisy
    variant, report = client.optimize("m", recipe(max_evaluations=4), accuracy_budget=2.0)
    row = report[1]
    assert row["within_budget"] is True and row["budget_setting"].startswith("test-noise ratio=") and row["budget_evaluations"] == 4
    assert variant["recipe"].startswith(f"noise ({row['budget_setting']}: 4 evaluations, 4 probes, ") and variant["recipe"].endswith(" s)")
    [listed] = [v for v in client.model("m")["variants"] if v["name"] == "noise"]
    assert listed["recipe"] == variant["recipe"]  # what `slimctl variants` shows


def test_a_budget_no_setting_meets_registers_nothing_unless_asked(noisy, server):
    client, recipe = noisy
    path = recipe(gentle=0.5, aggressive=1.0)
    with pytest.raises(SlimServeClientError) as e:
        client.optimize("m", path, accuracy_budget=0.5)
    assert e.value.code == "FAILED_PRECONDITION"
    assert "noise: test-noise cannot stay within the budget of 0.5 points: the best it reached, at ratio=0.5, loses " in e.value.message
    assert "2 evaluations in " in e.value.message
    assert [v["name"] for v in client.model("m")["variants"]] == ["baseline"]
    [job] = client.jobs("m")
    assert job["status"] == "failed" and "cannot stay within the budget" in job["message"]

    result = CliRunner().invoke(
        app, ["--server", server.address, "optimize", "m", "--recipe", path, "--accuracy-budget", "0.5", "--keep-over-budget", "--json"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["recipe"].startswith("noise (test-noise ratio=0.5: 2 evaluations, 2 probes, ")
    assert record["recipe"].endswith("; over budget, kept on request)") and record["accuracy_delta"] < -0.5
