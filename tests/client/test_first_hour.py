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
