"""Triton's HTTP client (tritonclient.http, and .http.aio) against slimserve's REST port: the logic of Triton's
`simple_http_*` examples (triton-inference-server/client, src/python/examples) on the models they use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


def _save(path: Path, nodes, inputs, outputs) -> Path:
    model = helper.make_model(
        helper.make_graph(nodes, path.stem, inputs, outputs), opset_imports=[helper.make_opsetid("", 17)], ir_version=9
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _io(prefix: str, elem: int) -> list:
    return [helper.make_tensor_value_info(f"{prefix}{i}", elem, ["batch", 16]) for i in (0, 1)]


def simple_onnx(path: Path) -> Path:
    """Triton's `simple`: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, INT32 [-1, 16]."""
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]), helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    return _save(path, nodes, _io("INPUT", T.INT32), _io("OUTPUT", T.INT32))


def simple_string_onnx(path: Path) -> Path:
    """Triton's `simple_string`: the same sums over BYTES tensors of decimal integers."""
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["a"], to=T.INT32),
        helper.make_node("Cast", ["INPUT1"], ["b"], to=T.INT32),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Sub", ["a", "b"], ["difference"]),
        helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=T.STRING),
        helper.make_node("Cast", ["difference"], ["OUTPUT1"], to=T.STRING),
    ]
    return _save(path, nodes, _io("INPUT", T.STRING), _io("OUTPUT", T.STRING))


@pytest.fixture
def triton(server, client, tmp_path):
    client.register("simple", simple_onnx(tmp_path / "simple.onnx"))
    client.register("simple_string", simple_string_onnx(tmp_path / "simple_string.onnx"))
    with httpclient.InferenceServerClient(server.http_address, concurrency=4) as triton_client:
        yield triton_client


INPUT0 = np.arange(16, dtype=np.int32).reshape(1, 16)
INPUT1 = np.full((1, 16), -1, dtype=np.int32)


def simple_inputs(binary0: bool, binary1: bool) -> list:
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(INPUT0, binary_data=binary0)
    inputs[1].set_data_from_numpy(INPUT1, binary_data=binary1)
    return inputs


def assert_sums(result) -> None:
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), INPUT0 + INPUT1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), INPUT0 - INPUT1)


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_simple_http_infer_client(triton, compression):
    """simple_http_infer_client.py: JSON and binary inputs and outputs mixed, query parameters, compression both ways."""
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True), httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
    result = triton.infer(
        "simple",
        simple_inputs(False, True),
        outputs=outputs,
        query_params={"test_1": 1, "test_2": 2},
        request_compression_algorithm=compression,
        response_compression_algorithm=compression,
    )
    assert_sums(result)
    answer = result.get_response()
    assert answer["model_name"] == "simple" and answer["model_version"] == "baseline"
    assert "data" in answer["outputs"][1] and "data" not in answer["outputs"][0]
    assert_sums(triton.infer("simple", simple_inputs(False, True), outputs=None))  # every output, in binary
    with pytest.raises(InferenceServerException) as e:
        triton.infer("wrong_model_name", simple_inputs(False, True))
    assert e.value.status() == "404" and "model 'wrong_model_name' is not registered" in e.value.message()


def test_simple_http_async_infer_client(triton):
    """simple_http_async_infer_client.py: requests in flight together, answered each with its own result."""
    outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
    pending = [triton.async_infer("simple", simple_inputs(True, True), outputs=outputs, request_id=str(i)) for i in range(8)]
    for i, request in enumerate(pending):
        result = request.get_result()
        assert result.get_response()["id"] == str(i)
        assert_sums(result)


def test_simple_http_aio_infer_client(server, triton):
    """simple_http_aio_infer_client.py: the asyncio client (aiohttp under it)."""
    import tritonclient.http.aio as aioclient

    async def run():
        async with aioclient.InferenceServerClient(server.http_address) as aio:
            assert await aio.is_server_live() and await aio.is_model_ready("simple")
            inputs = [aioclient.InferInput("INPUT0", [1, 16], "INT32"), aioclient.InferInput("INPUT1", [1, 16], "INT32")]
            inputs[0].set_data_from_numpy(INPUT0, binary_data=False)
            inputs[1].set_data_from_numpy(INPUT1, binary_data=True)
            outputs = [aioclient.InferRequestedOutput("OUTPUT0", binary_data=True), aioclient.InferRequestedOutput("OUTPUT1")]
            return await asyncio.gather(*(aio.infer("simple", inputs, outputs=outputs) for _ in range(4)))

    for result in asyncio.run(run()):
        assert_sums(result)


def test_simple_http_health_metadata(triton):
    """simple_http_health_metadata.py (the server's name is slimserve, not triton)."""
    assert triton.is_server_live(query_params={"test_1": 1, "test_2": 2}) and triton.is_server_ready()
    assert triton.is_model_ready("simple") and triton.is_model_ready("simple", "baseline")
    assert not triton.is_model_ready("wrong_model_name")
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "slimserve" and "binary_tensor_data" in metadata["extensions"]
    metadata = triton.get_model_metadata("simple", query_params={"test_1": 1, "test_2": 2})
    assert metadata["name"] == "simple" and metadata["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("wrong_model_name")
    assert e.value.status() == "404" and "wrong_model_name" in e.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_simple_http_string_infer_client(triton, binary):
    """simple_http_string_infer_client.py: BYTES tensors of decimal integers, one input and output each way."""
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int32)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([str(x).encode() for x in in0.reshape(-1)], dtype=np.object_).reshape(1, 16), binary_data=binary)
    inputs[1].set_data_from_numpy(np.array([str(x) for x in in1.reshape(-1)], dtype=np.object_).reshape(1, 16), binary_data=not binary)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=not binary),
    ]
    result = triton.infer("simple_string", inputs, outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0").astype(np.int32), in0 + in1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1").astype(np.int32), in0 - in1)


def test_simple_http_model_control(triton):
    """simple_http_model_control.py, less the config override (not served yet): index, unload, load, a wrong name."""
    index = triton.get_model_repository_index()
    assert sorted((m["name"], m["state"]) for m in index) == [("simple", "READY"), ("simple_string", "READY")]
    triton.unload_model("simple")
    assert not triton.is_model_ready("simple")
    assert [m["name"] for m in triton.get_model_repository_index(query_params={"ready": "1"})] == ["simple", "simple_string"]
    triton.load_model("simple")
    assert triton.is_model_ready("simple")
    assert_sums(triton.infer("simple", simple_inputs(True, False)))
    with pytest.raises(InferenceServerException) as e:
        triton.load_model("wrong_model_name")
    assert e.value.status() == "404"


def test_a_refused_request_leaves_the_client_and_server_working(triton):
    """What the examples' error paths rely on: a 400 with the server's message, then service as usual."""
    bad = httpclient.InferInput("INPUT0", [1, 8], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 8), np.int32))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("simple", [bad, simple_inputs(True, True)[1]])
    assert e.value.status() == "400" and "input 'INPUT0': expected INT32 [-1,16], got INT32 [1,8]" in e.value.message()
    assert_sums(triton.infer("simple", simple_inputs(True, True)))
