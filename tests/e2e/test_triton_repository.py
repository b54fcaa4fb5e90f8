"""`slimserve start --model-repository DIR` as a process, called over REST as a Triton / KServe client would: a Triton
repository with a config, labels and two versions serves as its config.pbtxt says, and still does after a restart."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest

from tests.helpers import ServerProcess

CONFIG = """
name: "digits"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { all { } }
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
"""


def get(address: str, path: str) -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as answer:
        return json.loads(answer.read())


def infer(address: str, path: str, x) -> dict:
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.ravel().tolist()}],
        "outputs": [{"name": "logits", "parameters": {"classification": 1}}],
    }
    request = urllib.request.Request(f"http://{address}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
def test_a_triton_repository_serves_as_its_config_says_before_and_after_a_restart(tmp_path, digits):
    triton = tmp_path / "triton"
    for version in (1, 2):
        (triton / "digits" / str(version)).mkdir(parents=True)
        shutil.copyfile(digits.onnx, triton / "digits" / str(version) / "model.onnx")
    (triton / "digits" / "config.pbtxt").write_text(CONFIG)
    (triton / "digits" / "labels.txt").write_text(
        "\n".join(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    )
    (triton / "broken").mkdir()
    (triton / "broken" / "config.pbtxt").write_text("max_batch_size: -\n")
    log = tmp_path / "server.log"
    x = digits.x_test[:1]
    label = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][int(digits.y_test[0])]
    for start in ("first", "restart"):
        server = ServerProcess(tmp_path / "repository", log, "--model-repository", str(triton), http=True)
        try:
            address = server.http_address
            config = get(address, "/v2/models/digits/config")
            assert config["max_batch_size"] == 8 and config["output"][0]["label_filename"] == "labels.txt", start
            assert get(address, "/v2/models/digits")["versions"][:2] == ["1", "2"]
            for path, variant in (("/v2/models/digits/versions/1/infer", "baseline"), ("/v2/models/digits/infer", "v2")):
                answer = infer(address, path, x)
                assert answer["model_version"] == variant, start
                assert answer["outputs"][0]["data"][0].endswith(f":{label}"), answer  # "score:index:label"
            with pytest.raises(urllib.error.HTTPError) as e:
                get(address, "/v2/models/broken")
            assert e.value.code == 404
        finally:
            server.stop()
    text = log.read_text()
    assert "broken/config.pbtxt:1:17" in text and "optimization: slimserve picks" in text
