"""ModelStreamInfer (Triton's streaming API): answers by id, batching across a stream, errors on and of the stream."""

import queue
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc as pb_grpc
from tests.helpers import wait_until

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture
def digits_stub(client, digits):
    client.register("digits", digits.onnx, data=digits.data)
    return pb_grpc.GRPCInferenceServiceStub(client.channel)


def infer_request(x: np.ndarray, request_id: str, model: str = "digits") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return request


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))


def test_every_request_is_answered_by_id_and_requests_batch_together(server_factory, digits):
    # Calls handed to the compute pool (not run inline on the loop), so that requests gather while one runs.
    server = server_factory(inline_compute_ms=0)
    from slimserve.client.client import SlimServeClient

    with SlimServeClient(server.address) as client:
        client.register("digits", digits.onnx, data=digits.data)
    channel = grpc.insecure_channel(server.address)
    digits_stub = pb_grpc.GRPCInferenceServiceStub(channel)
    x = digits.x_test[:64]
    served = server.server.dataplane.models["digits"].variants["baseline"]
    stats, batcher = served.stats, served.batcher
    before_batches, before_samples = stats.batches, stats.samples
    # A digits call (~0.1 ms) can be faster than the stream's messages arrive on a busy machine (CI once saw all 64 run
    # alone). The first call is held (up to 10 s) until a quarter of the stream is queued behind it: whether queued
    # requests then merge is what this checks, on any machine.
    predict, first = batcher.predict, threading.Lock()

    def held(inputs, outputs):
        if first.acquire(blocking=False):
            until = time.monotonic() + 10
            while batcher.queued < len(x) // 4 and time.monotonic() < until:
                time.sleep(0.001)
        return predict(inputs, outputs)

    batcher.predict = held
    responses = list(digits_stub.ModelStreamInfer(iter([infer_request(x[i : i + 1], f"r{i}") for i in range(len(x))]), timeout=60))
    assert all(r.error_message == "" for r in responses)
    by_id = {r.infer_response.id: r.infer_response for r in responses}
    assert sorted(by_id) == sorted(f"r{i}" for i in range(len(x)))
    got = np.concatenate([logits_of(by_id[f"r{i}"]) for i in range(len(x))])
    expected = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert {r.infer_response.model_version for r in responses} == {"baseline"}
    # Requests of one stream run concurrently, so the batcher merges them.
    assert stats.samples - before_samples == len(x)
    assert stats.batches - before_batches < len(x)
    channel.close()


def test_a_failing_request_is_answered_with_its_error_and_the_stream_goes_on(digits_stub, digits):
    x = digits.x_test[:2]
    bad = pb.ModelInferRequest(model_name="digits", id="bad")
    bad.inputs.add(name="x", datatype="INT64", shape=[1, 2])
    bad.raw_input_contents.append(np.zeros((1, 2), np.int64).tobytes())
    requests = [infer_request(x[:1], "a"), bad, infer_request(x[:1], "gone", model="nope"), infer_request(x[1:], "b")]
    responses = list(digits_stub.ModelStreamInfer(iter(requests), timeout=60))
    assert len(responses) == 4
    errors = {r.infer_response.id: r.error_message for r in responses if r.error_message}
    assert errors["bad"].startswith("INVALID_ARGUMENT: ") and "got INT64 [1,2]" in errors["bad"]
    assert errors["gone"].startswith("NOT_FOUND: ") and "'nope'" in errors["gone"]
    answered = {r.infer_response.id for r in responses if not r.error_message}
    assert answered == {"a", "b"}


def test_a_message_that_does_not_parse_ends_the_stream_with_invalid_argument(digits_stub, client, digits):
    call = client.channel.stream_stream(STREAM, request_serializer=None, response_deserializer=pb.ModelStreamInferResponse.FromString)
    good = infer_request(digits.x_test[:1], "ok").SerializeToString()
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([good, b"\xff\xff\xff"]), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest" in caught.value.details()
    # The server goes on serving.
    assert digits_stub.ModelInfer(infer_request(digits.x_test[:1], "after"), timeout=30).id == "after"


def test_a_client_cancelling_its_stream_leaves_nothing_behind(digits_stub, server, digits):
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    for i in range(8):
        outbox.put(infer_request(digits.x_test[i : i + 1], f"c{i}"))
    stream = digits_stub.ModelStreamInfer(requests(), timeout=60)
    first = next(stream)
    assert first.error_message == ""
    stream.cancel()
    outbox.put(None)
    assert digits_stub.ModelInfer(infer_request(digits.x_test[:1], "after"), timeout=30).id == "after"
    labels = server.metrics.labels("digits", "baseline")
    inflight = lambda: server.metrics.registry.get_sample_value("slimserve_inflight_requests", labels)  # noqa: E731
    wait_until(lambda: inflight() == 0, "the in-flight gauge to drop to 0", timeout=10)


def test_stream_requests_are_counted_like_unary_ones(digits_stub, server, digits):
    labels = {**server.metrics.labels("digits", "baseline"), "code": "OK"}
    counter = lambda: server.metrics.registry.get_sample_value("slimserve_requests_total", labels)  # noqa: E731
    before = counter()
    list(digits_stub.ModelStreamInfer(iter([infer_request(digits.x_test[i : i + 1], f"m{i}") for i in range(5)]), timeout=60))
    assert counter() - before == 5


def test_a_stream_longer_than_its_in_flight_limit_is_answered_whole(digits_stub, digits, monkeypatch):
    from slimserve.server.grpc.servicers import stream

    monkeypatch.setattr(stream, "STREAM_IN_FLIGHT", 2)  # slots are freed as answers are written
    requests = [infer_request(digits.x_test[i % 8 : i % 8 + 1], f"l{i}") for i in range(40)]
    responses = list(digits_stub.ModelStreamInfer(iter(requests), timeout=60))
    assert sorted(r.infer_response.id for r in responses) == sorted(f"l{i}" for i in range(40))
    assert all(not r.error_message for r in responses)
