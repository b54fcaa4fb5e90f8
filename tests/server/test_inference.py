"""Inference over the Open Inference Protocol against an in-process server: answers, routing by variant, errors."""

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from slimserve.client.client import SlimServeClient, SlimServeClientError
from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc as pb_grpc
from tests.conftest import ECHO_TYPES, echo_arrays


@pytest.fixture
def digits_client(client, digits):
    client.register("digits", digits.onnx, data=digits.data)
    client.register("digits-pt2", digits.pt2, data=digits.data)
    return client


def ort_logits(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_onnx_answers_equal_onnxruntime_in_process(digits_client, digits):
    x = digits.x_test[:64]
    variant, outputs = digits_client.infer("digits", {"x": x})
    assert variant == "baseline"
    np.testing.assert_allclose(outputs["logits"], ort_logits(digits.onnx, x), rtol=1e-5, atol=1e-5)


def test_pt2_served_by_torch_agrees_with_onnx(digits_client, digits):
    x = digits.x_test
    _, outputs = digits_client.infer("digits-pt2", {"x": x})
    np.testing.assert_allclose(outputs["output_0"], ort_logits(digits.onnx, x), rtol=1e-4, atol=1e-4)
    assert (outputs["output_0"].argmax(1) == digits.y_test).mean() == pytest.approx(digits.accuracy)


def test_typed_contents_answered_raw_as_triton(digits_client, digits):
    x = digits.x_test[:3]
    stub = pb_grpc.GRPCInferenceServiceStub(digits_client.channel)
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.reshape(-1).tolist())
    response = stub.ModelInfer(request)
    assert not response.outputs[0].HasField("contents") and len(response.raw_output_contents) == 1
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 10)
    np.testing.assert_allclose(logits, ort_logits(digits.onnx, x), rtol=1e-5, atol=1e-5)


def test_raw_output_on_request_even_for_typed_input(digits_client, digits):
    _, outputs = digits_client.infer("digits", {"x": digits.x_test[:2]}, raw=False, parameters={"binary_data_output": True})
    assert outputs["logits"].shape == (2, 10)


def assert_echoed(sent, outputs):
    assert set(outputs) == {k.replace("in_", "out_") for k in sent}
    for name, array in sent.items():
        got = outputs[name.replace("in_", "out_")]
        assert got.shape == array.shape
        if array.dtype == object:
            assert got.tolist() == array.tolist()
        else:
            assert got.dtype == array.dtype
            np.testing.assert_array_equal(got, array)


def test_every_datatype_round_trips_raw(client, echo_onnx):
    client.register("echo", echo_onnx)
    sent = echo_arrays()
    assert_echoed(sent, client.infer("echo", sent)[1])


def test_every_typed_datatype_round_trips_typed(client, echo_typed_onnx):
    client.register("echo", echo_typed_onnx)
    sent = echo_arrays(types=[t for t in ECHO_TYPES if t != "FP16"])
    assert_echoed(sent, client.infer("echo", sent, raw=False)[1])


def test_non_utf8_bytes_for_a_string_model(client, echo_typed_onnx):
    client.register("echo", echo_typed_onnx)
    sent = echo_arrays(types=[t for t in ECHO_TYPES if t != "FP16"])
    sent["in_bytes"] = np.array([[b"\xff", b"a", b"b"]] * 2, dtype=object)
    with pytest.raises(SlimServeClientError) as e:
        client.infer("echo", sent)
    assert e.value.code == "INVALID_ARGUMENT" and "'in_bytes': BYTES element 0 is not UTF-8" in e.value.message


def test_requested_outputs_only(client, echo_onnx):
    client.register("echo", echo_onnx)
    _, outputs = client.infer("echo", echo_arrays(), outputs=["out_int8", "out_bytes"])
    assert set(outputs) == {"out_int8", "out_bytes"}


def test_model_version_pins_a_variant(digits_client, digits):
    variant, _ = digits_client.infer("digits", {"x": digits.x_test[:1]}, variant="baseline")
    assert variant == "baseline"
    with pytest.raises(SlimServeClientError) as e:
        digits_client.infer("digits", {"x": digits.x_test[:1]}, variant="int8")
    assert e.value.code == "NOT_FOUND"
    assert "no variant 'int8'" in e.value.message and "baseline" in e.value.message


@pytest.mark.parametrize(
    "inputs, code, message",
    [
        ({"x": np.zeros((1, 1, 8, 8), np.int64)}, "INVALID_ARGUMENT", "input 'x': expected FP32 [-1,1,8,8], got INT64 [1,1,8,8]"),
        ({"x": np.zeros((1, 3), np.float32)}, "INVALID_ARGUMENT", "input 'x': expected FP32 [-1,1,8,8], got FP32 [1,3]"),
        ({"y": np.zeros((1, 1, 8, 8), np.float32)}, "INVALID_ARGUMENT", "model 'digits' has no input 'y'"),
        ({}, "INVALID_ARGUMENT", "input 'x' is missing: model 'digits' expects FP32 [-1,1,8,8]"),
    ],
)
def test_malformed_requests_name_the_problem(digits_client, inputs, code, message):
    with pytest.raises(SlimServeClientError) as e:
        digits_client.infer("digits", inputs)
    assert e.value.code == code
    assert message in e.value.message


def test_unknown_model_and_output(digits_client, digits):
    with pytest.raises(SlimServeClientError) as e:
        digits_client.infer("nope", {"x": digits.x_test[:1]})
    assert (e.value.code, e.value.message) == ("NOT_FOUND", "Request for unknown model: 'nope' is not registered")
    with pytest.raises(SlimServeClientError) as e:
        digits_client.infer("digits", {"x": digits.x_test[:1]}, outputs=["probs"])
    assert e.value.code == "INVALID_ARGUMENT" and "no output 'probs'" in e.value.message and "logits" in e.value.message


def test_raw_bytes_of_the_wrong_length(digits_client):
    stub = pb_grpc.GRPCInferenceServiceStub(digits_client.channel)
    request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[b"\0" * 10])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1, 8, 8])
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 256 bytes of raw data, got 10" in e.value.details()


def test_metadata_and_readiness(digits_client):
    meta = digits_client.metadata("digits")
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1", "baseline"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 1, 8, 8])]
    assert digits_client.metadata("digits-pt2").platform == "pytorch_torchexport"
    assert digits_client.server_live() and digits_client.server_ready()
    assert digits_client.model_ready("digits") and not digits_client.model_ready("digits", "nope")
    assert not digits_client.model_ready("nope")


def test_repository_extension_unload_and_load(digits_client, digits):
    stub = pb_grpc.GRPCInferenceServiceStub(digits_client.channel)
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert {(m.name, m.version, m.state) for m in index.models} == {("digits", "1", "READY"), ("digits-pt2", "1", "READY")}
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"))
    with pytest.raises(SlimServeClientError) as e:
        digits_client.infer("digits", {"x": digits.x_test[:1]})
    assert e.value.code == "UNAVAILABLE" and "RepositoryModelLoad" in e.value.message
    states = {m.name: m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert states["digits"] == "UNAVAILABLE"
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))
    assert digits_client.infer("digits", {"x": digits.x_test[:1]})[0] == "baseline"


def test_restart_keeps_registered_models(server_factory, tmp_path, digits):
    first = server_factory(tmp_path / "repo")
    with SlimServeClient(first.address) as c:
        c.register("digits", digits.onnx, data=digits.data)
        _, before = c.infer("digits", {"x": digits.x_test[:8]})
    first.stop()
    second = server_factory(tmp_path / "repo")
    with SlimServeClient(second.address) as c:
        assert [m["name"] for m in c.models()] == ["digits"]
        assert c.models()[0]["datasets"] == ["data"]
        _, after = c.infer("digits", {"x": digits.x_test[:8]})
    np.testing.assert_array_equal(before["logits"], after["logits"])


def test_request_metrics_count_by_code(digits_client, server, digits):
    digits_client.infer("digits", {"x": digits.x_test[:1]})
    with pytest.raises(SlimServeClientError):
        digits_client.infer("digits", {"x": np.zeros((1, 2), np.float32)})
    registry = server.metrics.registry
    labels = {"model": "digits", "variant": "baseline", "node_type": "cpu"}
    assert registry.get_sample_value("slimserve_requests_total", {**labels, "code": "OK"}) == 1
    assert registry.get_sample_value("slimserve_requests_total", {**labels, "code": "INVALID_ARGUMENT"}) == 1
    assert registry.get_sample_value("slimserve_request_duration_seconds_count", labels) == 2
