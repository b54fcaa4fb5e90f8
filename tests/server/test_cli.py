"""`slimserve optimize` offline, and `slimserve start` refusing bad settings with a one-line reason."""

import json

from typer.testing import CliRunner

from server.cli import app

runner = CliRunner()


def test_offline_optimize_writes_model_and_report(digits, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["optimize", str(digits.onnx), "--recipe", "graph-ort", "--data", str(digits.data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").stat().st_size > 0
    rows = json.loads((out / "report.json").read_text())
    assert [r["variant"] for r in rows] == ["baseline", "graph-ort"]
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["graph-ort"]["accuracy"] == evaluation["baseline"]["accuracy"]


def test_offline_optimize_bad_recipe(digits, tmp_path):
    result = runner.invoke(app, ["optimize", str(digits.onnx), "--recipe", "shrink", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "unknown recipe or pass 'shrink'" in result.output


def test_start_refuses_unknown_node_type(tmp_path):
    result = runner.invoke(app, ["start", "--repository", str(tmp_path), "--node-type", "gpu-h900", "--grpc-port", "0"])
    assert result.exit_code == 2 and "node type 'gpu-h900' has no price" in result.output


def test_start_on_a_repository_another_server_writes_says_so_in_one_line(tmp_path):
    from server.repository import Repository

    writer = Repository(tmp_path / "repo")  # holds the writer lock, as a running server does
    try:
        result = runner.invoke(app, ["start", "--repository", str(tmp_path / "repo"), "--grpc-port", "0", "--metrics-port", "-1"])
    finally:
        writer.close()
    assert result.exit_code == 2
    assert "is in use by another slimserve" in result.output and "--read-only" in result.output
    assert "Traceback" not in result.output


def test_start_refuses_an_unknown_device_before_touching_the_repository(tmp_path):
    result = runner.invoke(app, ["start", "--repository", str(tmp_path / "repo"), "--device", "tpu", "--grpc-port", "0"])
    assert result.exit_code == 2 and "'tpu' is not one of auto, cpu, cuda" in result.output
    assert not (tmp_path / "repo").exists()
