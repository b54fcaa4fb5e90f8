"""`slimserve optimize` offline, and `slimserve start` refusing bad settings with a one-line reason."""

import json

from typer.testing import CliRunner

from slimserve.server.cli import app

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


def test_offline_optimize_keeps_a_variant_over_budget_only_when_asked(tmp_path, monkeypatch):
    import numpy as np

    from tests.optimizer.test_budget import NoisePass, W, X
    from tests.optimizer.tiny_models import add_pass, dense_onnx, save_npz

    add_pass(monkeypatch, NoisePass, "test-noise")
    model = dense_onnx(tmp_path / "m.onnx", W, output="logits")
    data = save_npz(tmp_path / "eval.npz", x=X, labels=(np.maximum(X @ W[0], 0) @ W[1]).argmax(1))
    recipe = tmp_path / "noise.json"
    budget = {"gentle": 0.5, "aggressive": 1.0}  # both ends lose more than 0.5 points
    recipe.write_text(json.dumps({"version": 1, "name": "noise", "passes": [{"pass": "test-noise", "budget": budget}]}))
    out = tmp_path / "out"
    args = ["optimize", str(model), "--recipe", str(recipe), "--data", str(data), "--out", str(out), "--accuracy-budget", "0.5"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "test-noise cannot stay within the budget of 0.5 points" in refused.output
    assert not out.exists()
    kept = runner.invoke(app, [*args, "--keep-over-budget"])
    assert kept.exit_code == 0, kept.output
    row = json.loads((out / "report.json").read_text())[1]
    assert row["within_budget"] is False and row["budget_setting"] == "test-noise ratio=0.5" and row["accuracy_delta_pt"] < -0.5
    assert (out / "model.onnx").stat().st_size > 0


def test_start_refuses_unknown_node_type(tmp_path):
    result = runner.invoke(app, ["start", "--repository", str(tmp_path), "--node-type", "gpu-h900", "--grpc-port", "0"])
    assert result.exit_code == 2 and "node type 'gpu-h900' has no price" in result.output


def test_start_on_a_repository_another_server_writes_says_so_in_one_line(tmp_path):
    from slimserve.server.store.repository import Repository

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


def test_passes_offline_shows_what_slimctl_shows():
    result = runner.invoke(app, ["passes", "quantize-static", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["needs"] == ["calibration data (--calibration)"]
    assert {"name": "exclude", "type": "list[str]", "default": "[]", "description": "node names kept in FP32"} in record["settings"]
    listed = runner.invoke(app, ["passes"])
    assert listed.exit_code == 0 and "graph-ort" in listed.output
    unknown = runner.invoke(app, ["passes", "shrink"])
    assert unknown.exit_code == 1 and "unknown pass 'shrink'" in unknown.output


def test_offline_optimize_refuses_an_operator_no_runtime_here_implements(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    result = runner.invoke(app, ["optimize", str(path), "--recipe", "graph-ort", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "custom.onnx does not load in onnxruntime on this node" in result.output and "Frobnicate" in result.output
    assert not (tmp_path / "out").exists()
