"""An unmodified Triton client (tritonclient.grpc from PyPI) gets correct answers from slimserve."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

HERE = Path(__file__).parent


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_tritonclient_round_trip(client, server, digits, tmp_path, fmt):
    client.register("digits", getattr(digits, fmt), data=digits.data)
    x = digits.x_test[:16]
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [sys.executable, str(HERE / "triton_check.py"), server.address, "digits", str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    expected = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.array(seen["output"], np.float32), expected, rtol=1e-4, atol=1e-4)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server"] == "slimserve" and seen["id"] == "r1" and seen["version"] == "baseline"
    assert seen["platform"] == {"onnx": "onnxruntime_onnx", "pt2": "pytorch_torchexport"}[fmt]
    assert seen["index"] == ["digits"]
    assert seen["error_status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x': expected FP32 [-1,1,8,8], got INT64 [1,2]" in seen["error_message"]
    assert seen["missing_status"] == "StatusCode.NOT_FOUND"
    # ModelStreamInfer: every request answered once, by id, with the same numbers; failures on the stream
    streamed = np.array([seen["stream_outputs"][f"s{i}"][0] for i in range(len(x))], np.float32)
    np.testing.assert_allclose(streamed, expected, rtol=1e-4, atol=1e-4)
    assert len(seen["stream_outputs"]) == len(x)
    bad, missing = seen["stream_errors"]
    assert bad.startswith("INVALID_ARGUMENT: ") and "got INT64 [1,2]" in bad
    assert missing.startswith("NOT_FOUND: ") and "no-such-model" in missing
