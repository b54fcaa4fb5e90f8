"""Triton's HTTP client (tritonclient.http, and .http.aio) against slimserve's REST port: the logic of Triton's
`simple_http_*` examples (triton-inference-server/client, src/python/examples) on the models they use."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

httpclient = pytest.importorskip("tritonclient.http")
import tritonclient.utils.shared_memory as shm  # noqa: E402
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
    assert e.value.status() == "404" and "Request for unknown model: 'wrong_model_name' is not registered" in e.value.message()


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
    """simple_http_model_control.py: index, unload, load, a wrong name (the config override has its own test below)."""
    index = triton.get_model_repository_index()
    assert sorted((m["name"], m["version"], m["state"]) for m in index) == [("simple", "1", "READY"), ("simple_string", "1", "READY")]
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


def refusal(call) -> tuple[str, str]:
    """The HTTP status and message of a call the server refuses."""
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status(), e.value.message()


def test_server_metadata_lists_the_extensions_of_both_ports(triton):
    from slimserve.server.grpc.servicers.inference import EXTENSIONS

    extensions = triton.get_server_metadata()["extensions"]
    assert extensions == [*EXTENSIONS, "binary_tensor_data"]
    assert {"statistics", "model_configuration", "system_shared_memory", "classification", "logging"} <= set(extensions)


def test_get_model_config_is_tritons_json(triton):
    """image_client.py / perf_analyzer -i http: the ModelConfig itself, proto field names, numbers as numbers."""
    for version in ("", "1", "baseline"):
        config = triton.get_model_config("simple", version)
        assert config["name"] == "simple" and config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
        assert config["max_batch_size"] == 32
        assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
            ("INPUT0", "TYPE_INT32", [16]),
            ("INPUT1", "TYPE_INT32", [16]),
        ]
        assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
            ("OUTPUT0", "TYPE_INT32", [16]),
            ("OUTPUT1", "TYPE_INT32", [16]),
        ]
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500
        assert config["instance_group"][0]["count"] == 2 and config["instance_group"][0]["kind"] == "KIND_CPU"
    assert triton.get_model_config("simple_string")["input"][0]["data_type"] == "TYPE_STRING"
    assert refusal(lambda: triton.get_model_config("simple", "9"))[0] == "404"
    assert refusal(lambda: triton.get_model_config("wrong_model_name"))[0] == "404"


def test_get_inference_statistics_counts_what_ran(triton):
    for _ in range(3):
        assert_sums(triton.infer("simple", simple_inputs(True, True)))
    (stats,) = triton.get_inference_statistics("simple")["model_stats"]
    assert stats["name"] == "simple" and stats["version"] == "1"
    infer = stats["inference_stats"]
    assert infer["success"]["count"] == 3 and infer["success"]["ns"] > 0 and infer["fail"] == {"count": 0, "ns": 0}
    assert infer["cache_hit"] == {"count": 0, "ns": 0}  # every duration is written, as Triton does
    assert stats["inference_count"] == 3 and stats["execution_count"] == sum(b["compute_infer"]["count"] for b in stats["batch_stats"])
    assert stats["last_inference"] > 0
    assert triton.get_inference_statistics("simple", "1") == triton.get_inference_statistics("simple", "baseline")
    names = [s["name"] for s in triton.get_inference_statistics()["model_stats"]]
    assert sorted(names) == ["simple", "simple_string"]
    assert refusal(lambda: triton.get_inference_statistics("wrong_model_name"))[0] == "404"


def test_log_settings_read_and_change(triton):
    before = triton.get_log_settings()
    assert before["log_file"] == "" and before["log_format"] == "default" and isinstance(before["log_info"], bool)
    try:
        after = triton.update_log_settings({"log_verbose_level": 1, "log_format": "ISO8601"})
        assert after["log_verbose_level"] == 1 and after["log_format"] == "ISO8601"
        assert triton.get_log_settings() == after
        status, message = refusal(lambda: triton.update_log_settings({"log_colour": True}))
        assert status == "400" and "log_colour" in message
        assert triton.get_log_settings() == after  # a refused update changes nothing
    finally:
        triton.update_log_settings({"log_verbose_level": before["log_verbose_level"], "log_format": "default"})


def test_load_model_with_a_config_overrides_the_serving_settings(triton):
    """Model Analyzer's remote mode: load_model(config=JSON) until the next plain load; a bad config changes nothing."""
    good = {
        "max_batch_size": 8,
        "dynamic_batching": {"preferred_batch_size": [4], "max_queue_delay_microseconds": 100},
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
    }
    served = triton.get_model_config("simple")
    triton.load_model("simple", config=json.dumps(good))
    loaded = triton.get_model_config("simple")
    assert loaded["max_batch_size"] == 8 and loaded["instance_group"][0]["count"] == 2
    assert loaded["dynamic_batching"]["preferred_batch_size"] == [4] and loaded["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert_sums(triton.infer("simple", simple_inputs(True, True)))
    for config, text in [
        ("{not json", "load config is not valid JSON"),
        (json.dumps({"sequence_batching": {}}), "sequence_batching"),
        (json.dumps({"max_batch_size": -1}), "max_batch_size must be >= 0"),
    ]:
        status, message = refusal(lambda config=config: triton.load_model("simple", config=config))
        assert status == "400" and text in message, message
    assert triton.get_model_config("simple") == loaded
    triton.load_model("simple")
    assert triton.get_model_config("simple") == served


def test_class_count_answers_the_top_k(triton):
    """image_client.py's classification: InferRequestedOutput(class_count=K), binary and JSON."""
    for binary in (True, False):
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=3)]
        top = triton.infer("simple", simple_inputs(True, True), outputs=outputs).as_numpy("OUTPUT0")
        sums = (INPUT0 + INPUT1)[0]
        expected = [f"{sums[i]}:{i}" for i in np.argsort(-sums, kind="stable")[:3]]
        assert [b.decode() if isinstance(b, bytes) else b for b in top.reshape(-1)] == expected
    too_many = [httpclient.InferRequestedOutput("OUTPUT0", class_count=17)]
    status, message = refusal(lambda: triton.infer("simple", simple_inputs(True, True), outputs=too_many))
    assert status == "400" and "class_count 17" in message


@pytest.fixture
def regions():
    """Two POSIX shared-memory objects as simple_http_shm_client.py makes them, destroyed afterwards."""
    made = []

    def make(name: str, size: int):
        key = f"/slimserve_http_{name}_{uuid.uuid4().hex[:8]}"
        made.append(shm.create_shared_memory_region(name, key, size))
        return made[-1], key

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_simple_http_shm_client(triton, regions):
    """simple_http_shm_client.py: inputs and outputs by region, status, unregister; then the refusals."""
    size = INPUT0.nbytes
    (in_handle, in_key), (out_handle, out_key) = regions("input_data", 2 * size), regions("output_data", 2 * size)
    shm.set_shared_memory_region(in_handle, [INPUT0])
    shm.set_shared_memory_region(in_handle, [INPUT1], offset=size)
    triton.register_system_shared_memory("input_data", in_key, 2 * size)
    triton.register_system_shared_memory("output_data", out_key, 2 * size)
    status = triton.get_system_shared_memory_status()
    assert sorted(r["name"] for r in status) == ["input_data", "output_data"]
    assert triton.get_system_shared_memory_status("input_data") == [
        {"name": "input_data", "key": in_key, "offset": 0, "byte_size": 2 * size}
    ]

    inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_shared_memory("input_data", size)
    inputs[1].set_shared_memory("input_data", size, offset=size)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True), httpclient.InferRequestedOutput("OUTPUT1", binary_data=True)]
    outputs[0].set_shared_memory("output_data", size)
    outputs[1].set_shared_memory("output_data", size, offset=size)
    result = triton.infer("simple", inputs, outputs=outputs)
    out0 = result.get_output("OUTPUT0")
    assert (out0["datatype"], out0["shape"]) == ("INT32", [1, 16]) and "data" not in out0
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.int32, [1, 16]), INPUT0 + INPUT1)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=size), INPUT0 - INPUT1)

    small = [httpclient.InferRequestedOutput("OUTPUT0")]
    small[0].set_shared_memory("output_data", 16)
    status, message = refusal(lambda: triton.infer("simple", inputs, outputs=small))
    assert status == "400" and "needs 64 bytes" in message
    past = httpclient.InferInput("INPUT0", [1, 16], "INT32")
    past.set_shared_memory("input_data", size, offset=size + 8)
    status, message = refusal(lambda: triton.infer("simple", [past, inputs[1]]))
    assert status == "400" and "exceeds its 128 registered bytes" in message
    status, message = refusal(lambda: triton.register_system_shared_memory("input_data", in_key, size))
    assert status == "409"
    status, message = refusal(lambda: triton.register_system_shared_memory("nope", "/slimserve_no_such_key", 64))
    assert status == "400" and "cannot be opened" in message

    triton.unregister_system_shared_memory("input_data")
    status, message = refusal(lambda: triton.infer("simple", inputs, outputs=outputs))
    assert status == "400" and "shared memory region 'input_data' is not registered" in message
    assert refusal(lambda: triton.get_system_shared_memory_status("input_data"))[0] == "404"
    triton.unregister_system_shared_memory("input_data")  # Triton's rule: unregistering an unknown name succeeds
    triton.unregister_system_shared_memory()
    assert triton.get_system_shared_memory_status() == []
    assert_sums(triton.infer("simple", simple_inputs(True, True)))  # the server keeps serving


def test_trace_settings_answer_as_triton_and_cuda_shared_memory_holds_no_region(triton):
    assert triton.get_trace_settings() == {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1", "trace_mode": "opentelemetry"}
    own = triton.update_trace_settings("simple", {"trace_level": ["TIMESTAMPS"], "trace_count": "3"})
    assert own["trace_level"] == ["TIMESTAMPS"] and own["trace_count"] == "3" and triton.get_trace_settings()["trace_level"] == ["OFF"]
    assert triton.update_trace_settings("simple", {"trace_level": None, "trace_count": None}) == triton.get_trace_settings()
    status, message = refusal(lambda: triton.update_trace_settings(settings={"trace_level": ["TENSORS"]}))
    assert status == "400" and "TENSORS is not supported" in message
    status, message = refusal(lambda: triton.get_trace_settings("no-such-model"))
    assert status == "404" and "no-such-model" in message
    # Triton's shm examples list and unregister CUDA regions before they start: nothing is registered, nothing fails.
    assert triton.get_cuda_shared_memory_status() == []
    triton.unregister_cuda_shared_memory()
    status, message = refusal(lambda: triton.register_cuda_shared_memory("gpu", b"aGFuZGxl", 0, 64))
    assert status == "501" and "system shared memory only" in message
