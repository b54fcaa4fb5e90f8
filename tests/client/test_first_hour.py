"""Small surprises of a newcomer's first hour (issue 26): a bare --server host, float64 data, deleting a serving variant, auto's footer."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from slimserve.client.cli import app
from slimserve.client.report import _search_caption
from slimserve.client.transport import with_default_port

runner = CliRunner()


@pytest.mark.parametrize(
    ("given", "dialled"),
    [
        ("127.0.0.1", "127.0.0.1:8001"),
        ("models.internal", "models.internal:8001"),
        ("host:9000", "host:9000"),
        ("[::1]", "[::1]:8001"),
        ("::1", "[::1]:8001"),
        ("[::1]:7000", "[::1]:7000"),
        ("unix:/tmp/slimserve.sock", "unix:/tmp/slimserve.sock"),
        ("dns:///models.internal:8001", "dns:///models.internal:8001"),
    ],
)
def test_a_bare_host_means_port_8001(given, dialled):
    assert with_default_port(given) == dialled


def test_a_bare_host_reaches_a_server_on_8001_not_443(monkeypatch):
    from slimserve.client.client import SlimServeClient

    with SlimServeClient("127.0.0.1") as c:
        assert c.server == "127.0.0.1:8001"


def test_float64_data_is_cast_with_the_same_note_by_register_and_infer(server, tmp_path):
    # An FP32 echo model fed a float64 array: register accepts it and says so; infer casts it and says the same.
    from tests.conftest import echo_arrays, make_echo_onnx

    echo_typed_onnx = make_echo_onnx(tmp_path / "echo.onnx", ["FP32"])
    arrays = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in echo_arrays(types=["FP32"]).items()}
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    result = runner.invoke(app, ["--server", server.address, "register", "echo", str(echo_typed_onnx), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "'in_fp32' in data.npz is float64; cast to the model's FP32" in result.output
    result = runner.invoke(app, ["--server", server.address, "infer", "echo", str(data)])
    assert result.exit_code == 0, result.output
    assert "'in_fp32' in data.npz is float64; cast to the model's FP32" in result.output


def test_deleting_a_serving_variant_says_where_its_traffic_went(server, echo_onnx):
    slimctl = lambda *a: runner.invoke(app, ["--server", server.address, *a])  # noqa: E731
    assert slimctl("register", "echo", str(echo_onnx)).exit_code == 0
    server.add_variant("echo", "fast", echo_onnx)
    assert slimctl("traffic", "echo", "fast=1").exit_code == 0
    result = slimctl("delete", "echo", "--variant", "fast")
    assert result.exit_code == 0, result.output
    assert "its 100% of the traffic now goes to baseline (traffic: baseline 100%)" in result.output
    server.add_variant("echo", "idle", echo_onnx)
    result = slimctl("delete", "echo", "--variant", "idle")
    assert "it served no traffic (traffic: baseline 100%)" in result.output


def test_auto_footer_speaks_of_the_chosen_candidate_only():
    rows = [
        {"variant": "baseline", "recipe": "", "chosen": False},
        {"recipe": "prune-structured", "chosen": False, "within_budget": False, "budget_setting": "pruning_ratio=0.6", "budget_pt": 1.0},
        {"recipe": "quantize-dynamic", "chosen": True, "within_budget": True, "budget_setting": "per_channel", "budget_pt": 1.0},
    ]
    caption = _search_caption(rows)
    assert "per_channel" in caption and "kept on request" not in caption and "over budget" not in caption
    kept = [{"variant": "baseline"}, {"variant": "p", "within_budget": False, "budget_setting": "ratio=0.5", "budget_pt": 1.0}]
    assert "(over budget, kept on request)" in _search_caption(kept)


def test_a_rollout_says_what_it_waits_for_and_its_deadline():
    from datetime import UTC, datetime

    from slimserve.client.cli_rollout import waiting_for

    r = {
        "state": "shadow",
        "variant": "int8",
        "requests": {"int8": 0, "baseline": 0},
        "plan": {"min_requests": 200, "max_stage_s": 900.0},
        "history": [
            {"kind": "started", "time": "2026-12-07T13:00:00.000+00:00"},
            {"kind": "stage", "time": "2026-12-07T13:00:00.000+00:00"},
        ],
    }
    lines = waiting_for(r, now=datetime(2026, 12, 7, 13, 5, tzinfo=UTC))
    assert lines[0].startswith("waiting for 200 shadow requests (have 0)")
    assert lines[1] == "stage deadline 2026-12-07 13:15:00 UTC (in 10m 0s): still undecided then, it rolls back"
    r.update(state="canary", requests={"int8": 250, "baseline": 900})
    assert (
        waiting_for(r, now=datetime(2026, 12, 7, 13, 5, tzinfo=UTC))[0]
        == "250 canary requests of 200 needed: waiting for the gates to decide"
    )


def test_rollout_help_shows_the_plans_defaults():
    from slimserve.client.cli_rollout import DEFAULT_MAX_STAGE_S, DEFAULT_MIN_REQUESTS
    from slimserve.server.rollout.plan import RolloutPlan

    assert (RolloutPlan().min_requests, RolloutPlan().max_stage_s) == (DEFAULT_MIN_REQUESTS, DEFAULT_MAX_STAGE_S)
    result = runner.invoke(app, ["rollout", "start", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())  # the help panel wraps its lines
    assert "(default 500, or the --plan's)" in text and "(default 3600 s = 1 h, or the --plan's)" in text


def test_a_rollout_says_where_a_standing_share_goes(server, echo_onnx, client):
    client.register("echo", echo_onnx)
    server.add_variant("echo", "fast", echo_onnx)
    client.traffic("echo", {"baseline": 0.7, "fast": 0.3})
    status = client.rollout_start("echo", "fast", None, None, None, None, None)
    messages = [e["message"] for e in status["history"]]
    assert any("standing shares 'fast' 30% go to 'baseline'" in m and "an abort or a rollback gives them back" in m for m in messages)
    client.rollout_abort("echo")
    assert client.traffic("echo")["weights"] == pytest.approx({"baseline": 0.7, "fast": 0.3})
