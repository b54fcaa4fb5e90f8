"""The REST port (server/http/): health, metadata, JSON and binary-tensor inference, the repository, as curl would call them."""

from __future__ import annotations

import http.client
import json
import struct
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import echo_arrays

LABELS = {"model": "digits", "variant": "baseline", "node_type": "cpu"}


def call(
    address: str, method: str, path: str, body: bytes | str | None = None, headers: dict[str, str] | None = None, context=None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request: (status, headers, body)."""
    host, port = address.rsplit(":", 1)
    if context is None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
    else:
        conn = http.client.HTTPSConnection(host, int(port), timeout=60, context=context)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post_json(address: str, path: str, value: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = call(address, "POST", path, json.dumps(value), {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(body) if body else None


def binary_request(header: dict[str, Any], *raw: bytes) -> tuple[bytes, dict[str, str]]:
    """A body in Triton's binary tensor extension: the JSON, then the tensors; the header says where the JSON ends."""
    head = json.dumps(header).encode()
    return head + b"".join(raw), {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def binary_outputs(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON header of a binary answer and each binary output's bytes."""
    length = int(headers["Inference-Header-Content-Length"])
    answer, offset, raw = json.loads(body[:length]), length, {}
    for output in answer["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw[output["name"]] = body[offset : offset + size]
            offset += size
    assert offset == len(body)
    return answer, raw


def expected_digits(digits, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def rest(server, client, digits):
    client.register("digits", digits.onnx, data=digits.data)
    return server


def test_health_and_readiness_answer_by_status_with_an_empty_body(rest):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready", "/v2/models/digits/versions/baseline/ready"):
        status, _, body = call(rest.http_address, "GET", path)
        assert (status, body) == (200, b""), path
    for path in ("/v2/models/nope/ready", "/v2/models/digits/versions/nope/ready"):
        assert call(rest.http_address, "GET", path)[0] == 400, path


def test_server_and_model_metadata(rest):
    status, _, body = call(rest.http_address, "GET", "/v2")
    meta = json.loads(body)
    assert status == 200 and meta["name"] == "slimserve" and "model_repository" in meta["extensions"]
    for path in ("/v2/models/digits", "/v2/models/digits/versions/baseline"):
        status, _, body = call(rest.http_address, "GET", path)
        meta = json.loads(body)
        assert status == 200 and meta["name"] == "digits" and meta["versions"] == ["1", "baseline"]
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["outputs"][0]["datatype"] == "FP32"
    status, _, body = call(rest.http_address, "GET", "/v2/models/nope")
    assert status == 404 and "Request for unknown model: 'nope' is not registered" in json.loads(body)["error"]


def test_json_inference_matches_the_model_and_goes_through_the_data_plane(rest, digits):
    x = digits.x_test[:3]
    request = {"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}
    status, answer = post_json(rest.http_address, "/v2/models/digits/infer", request)
    assert status == 200 and answer["id"] == "r1" and answer["model_name"] == "digits" and answer["model_version"] == "baseline"
    (output,) = answer["outputs"]
    assert output["datatype"] == "FP32" and output["shape"] == [3, 10] and "parameters" not in output
    np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(3, 10), expected_digits(digits, x), rtol=1e-4, atol=1e-4)
    # the same counters as gRPC: one request, answered OK, on the variant it was routed to
    assert rest.metrics.registry.get_sample_value("slimserve_requests_total", {**LABELS, "code": "OK"}) == 1
    # a flat `data` list is the same tensor, row-major; the version path pins the variant
    request["inputs"][0]["data"] = x.reshape(-1).tolist()
    status, flat = post_json(rest.http_address, "/v2/models/digits/versions/baseline/infer", request)
    assert status == 200 and flat["outputs"] == answer["outputs"]


def test_binary_inputs_and_outputs(rest, digits):
    x = digits.x_test[:4]
    header = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    meta = json.loads(call(rest.http_address, "GET", "/v2/models/digits")[2])
    header["outputs"][0]["name"] = meta["outputs"][0]["name"]
    body, headers = binary_request(header, x.tobytes())
    status, response_headers, response = call(rest.http_address, "POST", "/v2/models/digits/infer", body, headers)
    assert status == 200 and response_headers["Content-Type"] == "application/octet-stream"
    answer, raw = binary_outputs(response_headers, response)
    (output,) = answer["outputs"]
    assert "data" not in output and output["shape"] == [4, 10]
    got = np.frombuffer(raw[output["name"]], np.float32).reshape(4, 10)
    np.testing.assert_allclose(got, expected_digits(digits, x), rtol=1e-4, atol=1e-4)
    # binary_data_output asks for every output in binary, whatever the outputs list says
    body, headers = binary_request({"inputs": header["inputs"], "parameters": {"binary_data_output": True}}, x.tobytes())
    status, response_headers, response = call(rest.http_address, "POST", "/v2/models/digits/infer", body, headers)
    assert status == 200 and binary_outputs(response_headers, response)[1][output["name"]] == raw[output["name"]]


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return array.tobytes()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(server, client, echo_onnx, binary):
    client.register("echo", echo_onnx)
    arrays = echo_arrays(batch=2)
    inputs, raw = [], []
    for name, array in arrays.items():
        datatype = name[3:].upper()
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw.append(_raw(array, datatype))
            entry["parameters"] = {"binary_data_size": len(raw[-1])}
        elif datatype == "BYTES":
            entry["data"] = [v.decode() for v in array.reshape(-1)]
        else:
            entry["data"] = array.tolist()
        inputs.append(entry)
    body, headers = binary_request({"inputs": inputs, "parameters": {"binary_data_output": binary}}, *raw)
    if not binary:
        headers = {"Content-Type": "application/json"}
        body = json.dumps({"inputs": inputs}).encode()
    status, response_headers, response = call(server.http_address, "POST", "/v2/models/echo/infer", body, headers)
    assert status == 200, response
    answer, raws = binary_outputs(response_headers, response) if binary else (json.loads(response), {})
    by_name = {o["name"]: o for o in answer["outputs"]}
    assert len(by_name) == len(arrays)
    for name, array in arrays.items():
        datatype = name[3:].upper()
        output = by_name["out" + name[2:]]
        assert output["datatype"] == datatype and output["shape"] == [2, 3]
        if binary:
            assert raws[output["name"]] == _raw(array, datatype), datatype
        elif datatype == "BYTES":
            assert output["data"] == [v.decode() for v in array.reshape(-1)]
        else:
            np.testing.assert_array_equal(np.array(output["data"], array.dtype).reshape(2, 3), array, err_msg=datatype)


def test_repository_index_load_and_unload(rest):
    status, index = post_json(rest.http_address, "/v2/repository/index", {})
    assert status == 200 and index == [{"name": "digits", "version": "1", "state": "READY", "reason": ""}]
    assert post_json(rest.http_address, "/v2/repository/models/digits/unload", {}) == (200, {})
    assert call(rest.http_address, "GET", "/v2/models/digits/ready")[0] == 400
    status, index = post_json(rest.http_address, "/v2/repository/index", {"ready": True})
    assert (status, index) == (200, [])
    status, _, body = call(rest.http_address, "POST", "/v2/models/digits/infer", json.dumps({"inputs": []}))
    assert status == 503 and "registered but not loaded" in json.loads(body)["error"]
    assert call(rest.http_address, "POST", "/v2/repository/models/digits/load")[0] == 200  # Triton's clients send no body
    assert call(rest.http_address, "GET", "/v2/models/digits/ready")[0] == 200
    status, answer = post_json(rest.http_address, "/v2/repository/models/nope/load", {})
    assert status == 404 and "nope" in answer["error"]


def test_the_port_is_off_with_minus_one_and_grpc_still_serves(server_factory):
    server = server_factory(http_port=-1)
    assert server.server.http_port is None and server.http_address is None
    from slimserve.client.client import SlimServeClient

    with SlimServeClient(server.address) as c:
        assert c.models() == []


def test_model_config_and_statistics_paths(rest, digits):
    for path in ("/v2/models/digits/config", "/v2/models/digits/versions/1/config", "/v2/models/digits/versions/baseline/config"):
        status, _, body = call(rest.http_address, "GET", path)
        config = json.loads(body)
        assert status == 200 and config["name"] == "digits" and config["max_batch_size"] == 32, path
        (entry,) = config["input"]  # every field written, defaults included, as Triton's JSON
        assert {k: entry[k] for k in ("name", "data_type", "format", "dims")} == {
            "name": "x",
            "data_type": "TYPE_FP32",
            "format": "FORMAT_NCHW",
            "dims": [1, 8, 8],
        }
        assert entry["is_shape_tensor"] is False and config["dynamic_batching"]["preserve_ordering"] is False
    x = digits.x_test[:2]
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}
    assert post_json(rest.http_address, "/v2/models/digits/infer", request)[0] == 200
    for path in ("/v2/models/stats", "/v2/models/digits/stats", "/v2/models/digits/versions/1/stats"):
        status, _, body = call(rest.http_address, "GET", path)
        (stats,) = json.loads(body)["model_stats"]
        assert status == 200 and stats["name"] == "digits" and stats["version"] == "1", path
        assert stats["inference_count"] == 2 and stats["inference_stats"]["success"]["count"] == 1
    status, _, body = call(rest.http_address, "GET", "/v2/models/digits/versions/7/stats")
    assert status == 404 and "no variant '7'" in json.loads(body)["error"]


def test_log_settings_get_and_post(rest):
    status, _, body = call(rest.http_address, "GET", "/v2/logging")
    before = json.loads(body)
    assert status == 200 and before["log_format"] == "default"
    try:
        status, after = post_json(rest.http_address, "/v2/logging", {"log_format": "ISO8601"})
        assert status == 200 and after == {**before, "log_format": "ISO8601"}
        status, answer = post_json(rest.http_address, "/v2/logging", {"log_format": "fancy"})
        assert status == 400 and "log_format must be one of" in answer["error"]
        status, _, body = call(rest.http_address, "POST", "/v2/logging", "[1]")
        assert status == 400 and "must be a JSON object" in json.loads(body)["error"]
    finally:
        post_json(rest.http_address, "/v2/logging", {"log_format": "default"})


def test_load_with_a_config_and_refused_load_parameters(rest):
    config = json.dumps({"max_batch_size": 4})
    assert post_json(rest.http_address, "/v2/repository/models/digits/load", {"parameters": {"config": config}}) == (200, {})
    assert json.loads(call(rest.http_address, "GET", "/v2/models/digits/config")[2])["max_batch_size"] == 4
    for parameters, text in [
        ({"config": "{not json"}, "load config is not valid JSON"),
        ({"config": 3}, "load parameter 'config' must be a string"),
        ({"config": "{}", "file:1/model.onnx": "eA=="}, "file:1/model.onnx"),
        ({"colour": "red"}, "load parameter 'colour' is not supported"),
    ]:
        status, answer = post_json(rest.http_address, "/v2/repository/models/digits/load", {"parameters": parameters})
        assert status == 400 and text in answer["error"], answer
    assert json.loads(call(rest.http_address, "GET", "/v2/models/digits/config")[2])["max_batch_size"] == 4  # unchanged
    assert post_json(rest.http_address, "/v2/repository/models/digits/unload", {"parameters": {"unload_dependents": False}}) == (200, {})
    assert post_json(rest.http_address, "/v2/repository/models/digits/unload", {}) == (200, {})  # not loaded: still succeeds


def test_cuda_shared_memory_lists_none_unregisters_nothing_and_refuses_a_region(rest):
    status, _, body = call(rest.http_address, "GET", "/v2/cudasharedmemory/status")
    assert status == 200 and json.loads(body) == []
    assert post_json(rest.http_address, "/v2/cudasharedmemory/unregister", {})[0] == 200
    status, answer = post_json(
        rest.http_address, "/v2/cudasharedmemory/region/gpu/register", {"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 64}
    )
    assert status == 501 and "system shared memory only" in answer["error"]
    status, _, body = call(rest.http_address, "GET", "/v2/cudasharedmemory/region/gpu/status")
    assert status == 404 and "is not registered" in json.loads(body)["error"]
