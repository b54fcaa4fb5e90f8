"""slimctl against an in-process server: tables for people, JSON for scripts, one-line errors with exit 1."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from slimserve.client.cli import app

runner = CliRunner()


def slimctl(server, *args):
    return runner.invoke(app, ["--server", server.address, *map(str, args)])


def test_register_models_infer_delete(server, digits, tmp_path):
    result = slimctl(server, "register", "digits", digits.onnx, "--data", digits.data)
    assert result.exit_code == 0, result.output
    assert "registered digits" in result.output and "FP32" in result.output

    result = slimctl(server, "models", "--json")
    assert result.exit_code == 0
    [record] = json.loads(result.stdout)
    assert record["name"] == "digits" and record["datasets"] == ["data"]

    result = slimctl(server, "models")
    assert "digits" in result.output and "baseline" in result.output

    result = slimctl(server, "infer", "digits", digits.data, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    logits = np.array(answer["outputs"]["logits"]["data"])
    assert answer["variant"] == "baseline" and logits.shape == (len(digits.y_test), 10)
    assert (logits.argmax(1) == digits.y_test).mean() == pytest.approx(digits.accuracy)

    out = tmp_path / "out.npz"
    result = slimctl(server, "infer", "digits", digits.data, "--output", out)
    assert "accuracy on 'labels'" in result.output
    assert np.load(out)["logits"].shape == (len(digits.y_test), 10)

    result = slimctl(server, "variants", "digits", "--json")
    [variant] = json.loads(result.stdout)
    assert set(variant) == {
        "name",
        "recipe",
        "parent",
        "runtime",
        "status",
        "params",
        "nonzero_params",
        "size_bytes",
        "flops",
        "latency_p50_ms",
        "latency_p99_ms",
        "throughput",
        "accuracy",
        "accuracy_delta",
    }
    assert variant["name"] == "baseline" and variant["runtime"] == "onnxruntime"

    assert slimctl(server, "delete", "digits").exit_code == 0
    assert json.loads(slimctl(server, "models", "--json").stdout) == []


def test_errors_are_one_line_with_exit_1(server, digits, tmp_path):
    result = slimctl(server, "infer", "nope", digits.data)
    assert result.exit_code == 1
    assert result.output.strip() == "slimctl: NOT_FOUND: Request for unknown model: 'nope' is not registered"

    result = slimctl(server, "register", "m", tmp_path / "missing.onnx")
    assert result.exit_code == 1 and "does not exist" in result.output

    slimctl(server, "register", "digits", digits.onnx)
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 1, 8, 8), np.float32))
    result = slimctl(server, "infer", "digits", bad)
    assert result.exit_code == 1 and "has no array for input 'x' (it holds: images)" in result.output


def test_no_server_says_so(tmp_path, digits):
    from tests.helpers import free_port

    result = runner.invoke(app, ["--server", f"127.0.0.1:{free_port()}", "models"])
    assert result.exit_code == 1 and "no slimserve answers at" in result.output


def test_client_package_needs_neither_torch_nor_onnxruntime():
    import subprocess
    import sys

    code = "import sys, slimserve.client.cli, slimserve.client.client, slimserve.client.codec; print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'slimserve.server', 'slimserve.optimizer') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_optimize_prints_report_and_variants_table(server, digits):
    slimctl(server, "register", "digits", digits.onnx, "--data", digits.data)
    result = slimctl(server, "optimize", "digits", "--recipe", "graph-ort")
    assert result.exit_code == 0, result.output
    assert "speed-up ×" in result.output and "graph-ort" in result.output
    result = slimctl(server, "variants", "digits")
    assert "graph-ort" in result.output and "baseline" in result.output
    result = slimctl(server, "optimize", "digits", "--recipe", "graph-ort", "--name", "g2", "--json")
    body = json.loads(result.stdout)
    assert body["name"] == "g2" and {r["variant"] for r in body["report"]} == {"baseline", "g2"}  # the whole report
    result = slimctl(server, "optimize", "digits", "--recipe", "nope")
    assert result.exit_code == 1 and result.output.startswith("slimctl: INVALID_ARGUMENT: ")


def test_infer_sends_a_large_file_in_parts_and_joins_the_outputs(server, digits, tmp_path, monkeypatch):
    """A file bigger than one request is sent in parts that each fit; the outputs come back whole and in order."""
    from slimserve.client import cli

    assert slimctl(server, "register", "digits", digits.onnx).exit_code == 0
    x = np.load(digits.data)["x"]
    whole = slimctl(server, "infer", "digits", digits.data, "--json")
    monkeypatch.setattr(cli, "ROWS_REQUEST_BYTES", x[0].nbytes * 7)  # 7 rows a request
    result = slimctl(server, "infer", "digits", digits.data, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert len(answer["request_ids"]) == -(-len(x) // 7) and len(set(answer["request_ids"])) == len(answer["request_ids"])
    parts = np.array(answer["outputs"]["logits"]["data"])
    assert parts.shape == (len(x), 10)
    np.testing.assert_allclose(parts, np.array(json.loads(whole.stdout)["outputs"]["logits"]["data"]), rtol=1e-5, atol=1e-5)


def test_passes_lists_every_pass_and_one_pass_shows_its_settings(server):
    result = slimctl(server, "passes")
    assert result.exit_code == 0, result.output
    assert "quantize-static" in result.output and "calibration data (--calibration)" in result.output

    result = slimctl(server, "passes", "--json")
    records = json.loads(result.stdout)
    assert [p["name"] for p in records][:3] == ["auto", "distill-feature", "distill-soft"]
    qat = next(p for p in records if p["name"] == "quantize-qat")
    assert qat["kind"] == "quantize" and qat["needs"] == ["train data (--train) with labels"]

    result = slimctl(server, "passes", "prune-weight", "--json")
    record = json.loads(result.stdout)
    settings = {s["name"]: s for s in record["settings"]}
    assert settings["sparsity"] == {
        "name": "sparsity",
        "type": "float",
        "default": "0.5",
        "description": "share of weights set to zero, in (0, 1)",
    }
    assert settings["finetune.lr"]["default"] == "0.0005"  # the pass's own default for the shared loop

    result = slimctl(server, "passes", "prune-weight")
    assert result.exit_code == 0 and "exclude" in result.output and "list[str]" in result.output

    result = slimctl(server, "passes", "shrink")
    assert result.exit_code == 1 and "unknown pass 'shrink' (known: auto," in result.output


def test_register_takes_a_config_and_labels_and_refuses_a_malformed_labels_flag(server, digits, tmp_path):
    config = tmp_path / "config.pbtxt"
    config.write_text("max_batch_size: 4\n")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(str(i) for i in range(10)))
    result = slimctl(server, "register", "digits", digits.onnx, "--labels", "logits")
    assert result.exit_code == 1 and "--labels 'logits': expected OUTPUT=FILE" in result.output
    result = slimctl(server, "register", "digits", digits.onnx, "--config", config, "--labels", f"logits={labels}")
    assert result.exit_code == 0, result.output
    view = server.server.control.model_config("digits")
    assert view.max_batch_size == 4 and view.label_files == {"logits": "labels.txt"}
