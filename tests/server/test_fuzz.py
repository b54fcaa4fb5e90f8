"""Bad input never hurts the server: malformed ModelInfer requests, explicit and fuzzed, get a precise status.

Every answer is OK or one of the statuses a caller can act on, with a message; never UNKNOWN or
INTERNAL, and the server answers correctly afterwards.
"""

from __future__ import annotations

import random

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimserve.client import codec
from slimserve.client.client import SlimServeClient
from slimserve.protos import inference_pb2 as pb
from tests.conftest import ECHO_TYPES, echo_arrays

INFER = "/inference.GRPCInferenceService/ModelInfer"
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE,
}


def identity(b: bytes) -> bytes:
    return b


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, digits, echo_onnx):
    """One server for the whole module (the fuzzers send thousands of requests to the same one)."""
    from tests.conftest import ServerHandle

    handle = ServerHandle(tmp_path_factory.mktemp("fuzz") / "repository")
    with SlimServeClient(handle.address) as c:
        c.register("digits", digits.onnx)
        c.register("echo", echo_onnx)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server):
    with grpc.insecure_channel(fuzz_server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def raw_infer(channel):
    return channel.unary_unary(INFER, request_serializer=identity, response_deserializer=identity)


def outcome(future) -> tuple[grpc.StatusCode, str]:
    try:
        future.result()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def send(raw_infer, payload: bytes) -> tuple[grpc.StatusCode, str]:
    return outcome(raw_infer.future(payload, timeout=30))


def assert_acceptable(results: list[tuple[bytes, grpc.StatusCode, str]]) -> None:
    bad = [
        (code.name, message, payload[:60])
        for payload, code, message in results
        if code not in ACCEPTABLE or (code != grpc.StatusCode.OK and not message)
    ]
    assert not bad, f"{len(bad)} answers were neither OK nor a precise refusal, e.g. {bad[:5]}"


def assert_serves_correctly(fuzz_server, digits) -> None:
    x = digits.x_test[:16]
    expected = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with SlimServeClient(fuzz_server.address) as c:
        variant, outputs = c.infer("digits", {"x": x})
        assert variant == "baseline"
        np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)
        _, echoed = c.infer("echo", echo_arrays())
        assert set(echoed) == {f"out_{t.lower()}" for t in ECHO_TYPES}
    for loaded in fuzz_server.server.dataplane.models.values():  # nothing left queued by a refused request
        assert all(v.batcher.queued == 0 for v in loaded.variants.values())


# ------------------------------------------------------------------ explicit cases


def request(
    model: str = "digits", datatype: str = "FP32", shape=(1, 1, 8, 8), raw: bytes | None = b"\0" * 256, name: str = "x", version: str = ""
) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, model_version=version)
    r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        r.raw_input_contents.append(raw)
    return r


def typed(values: list[float], shape=(1, 1, 8, 8)) -> pb.ModelInferRequest:
    r = request(raw=None, shape=shape)
    r.inputs[0].contents.fp32_contents.extend(values)
    return r


def duplicated() -> pb.ModelInferRequest:
    r = request()
    r.inputs.add(name="x", datatype="FP32", shape=[1, 1, 8, 8])
    r.raw_input_contents.append(b"\0" * 256)
    return r


def raw_and_typed() -> pb.ModelInferRequest:
    r = request()
    r.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    return r


def int8_out_of_range() -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="echo")
    for t in ECHO_TYPES:
        if t != "FP16":
            codec.fill_input(r, f"in_{t.lower()}", echo_arrays(1, [t])[f"in_{t.lower()}"], raw=False)
    r.inputs[[i.name for i in r.inputs].index("in_int8")].contents.int_contents[0] = 300
    return r


EXPLICIT = {
    "negative dim": (request(shape=(-1, 1, 8, 8)), "INVALID_ARGUMENT", "shape [-1, 1, 8, 8] has a negative dimension"),
    "huge dims": (request(shape=(2**40, 1, 8, 8)), "INVALID_ARGUMENT", "needs 281474976710656 bytes of raw data, got 256"),
    "dims whose product overflows int64": (request(shape=(2**62, 2**62, 8, 8)), "INVALID_ARGUMENT", "is too large for any tensor"),
    "no element, yet huge dims": (request(shape=(0, 2**62), raw=b""), "INVALID_ARGUMENT", "shape [0, 4611686018427387904] is too large"),
    "65 dimensions": (request(shape=[1] * 65, raw=b"\0" * 4), "INVALID_ARGUMENT", "shape has 65 dimensions; at most 64"),
    "zero dim in a fixed axis": (request(shape=(1, 0, 8, 8), raw=b""), "INVALID_ARGUMENT", "expected FP32 [-1,1,8,8], got FP32 [1,0,8,8]"),
    "raw too short": (request(raw=b"\0" * 255), "INVALID_ARGUMENT", "needs 256 bytes of raw data, got 255"),
    "raw too long": (request(raw=b"\0" * 257), "INVALID_ARGUMENT", "needs 256 bytes of raw data, got 257"),
    "raw entries != inputs": (
        pb.ModelInferRequest(model_name="digits", raw_input_contents=[b"", b""]),
        "INVALID_ARGUMENT",
        "request has 0 inputs but 2 raw_input_contents entries",
    ),
    "typed too few": (typed([0.0] * 63), "INVALID_ARGUMENT", "shape [1, 1, 8, 8] needs 64 values, got 63 in fp32_contents"),
    "typed too many": (typed([0.0] * 65), "INVALID_ARGUMENT", "needs 64 values, got 65 in fp32_contents"),
    "typed with huge dims": (
        typed([0.0], shape=(2**40, 1, 8, 8)),
        "INVALID_ARGUMENT",
        "needs 70368744177664 values, got 1 in fp32_contents",
    ),
    "typed, no element, huge dims": (typed([], shape=(0, 2**62)), "INVALID_ARGUMENT", "is too large for any tensor"),
    "typed out of range": (int8_out_of_range(), "INVALID_ARGUMENT", "'in_int8': a value in int_contents is out of range for INT8"),
    "FP16 typed": (request(datatype="FP16", raw=None), "INVALID_ARGUMENT", "FP16 has no typed contents field"),
    "raw and typed": (
        raw_and_typed(),
        "INVALID_ARGUMENT",
        "contents field must not be specified when using raw_input_contents for 'x' for model 'digits'",
    ),
    "BYTES with a forged count": (
        request("echo", "BYTES", (2**40, 3), b"\0" * 8, "in_bytes"),
        "INVALID_ARGUMENT",
        "8 bytes of raw BYTES data cannot hold 3298534883328 elements",
    ),
    "BYTES count beyond numpy": (
        request("echo", "BYTES", (2**62, 4), b"\0" * 8, "in_bytes"),
        "INVALID_ARGUMENT",
        "shape [4611686018427387904, 4] is too large for any tensor",
    ),
    "unknown datatype": (request(datatype="FP8"), "INVALID_ARGUMENT", "unknown datatype 'FP8'"),
    "empty datatype": (request(datatype=""), "INVALID_ARGUMENT", "unknown datatype ''"),
    "empty input name": (request(name=""), "INVALID_ARGUMENT", "input #0 has no name"),
    "path-like input name": (request(name="../x"), "INVALID_ARGUMENT", "model 'digits' has no input '../x'"),
    "input twice": (duplicated(), "INVALID_ARGUMENT", "input 'x' appears twice"),
    "empty model name": (request(model=""), "NOT_FOUND", "Request for unknown model: '' is not registered"),
    "path-like model name": (
        request(model="../../etc/passwd"),
        "NOT_FOUND",
        "Request for unknown model: '../../etc/passwd' is not registered",
    ),
    "path-like variant": (request(version="../baseline"), "NOT_FOUND", "model 'digits' has no variant '../baseline'"),
    "NUL in model name": (request(model="digits\0"), "NOT_FOUND", "is not registered"),
}


@pytest.mark.parametrize("case", list(EXPLICIT))
def test_each_malformed_request_is_refused_with_a_message_that_names_the_problem(raw_infer, case):
    message, code, text = EXPLICIT[case]
    got_code, details = send(raw_infer, message.SerializeToString())
    assert (got_code.name, text in details) == (code, True), details


@pytest.mark.parametrize(
    "payload, text",
    [
        (b"\xff\xff\xff", "not a valid inference.ModelInferRequest"),
        (b"\x0a\x05ab", "not a valid inference.ModelInferRequest"),  # a string that ends past the message
        (b"\x0a\x02\xc3\x28", "not a valid inference.ModelInferRequest"),  # model_name that is not UTF-8
    ],
)
def test_bytes_that_do_not_parse_are_invalid_argument_not_unknown(raw_infer, payload, text):
    code, details = send(raw_infer, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and text in details


def test_undecodable_upload_and_management_messages_are_invalid_argument(channel, fuzz_server):
    register = channel.stream_unary("/slimserve.v1.ModelRegistry/Register", request_serializer=identity, response_deserializer=identity)
    with pytest.raises(grpc.RpcError) as e:
        register(iter([b"\xff\xff"]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "slimserve.v1.RegisterRequest" in e.value.details()
    optimize = channel.unary_stream("/slimserve.v1.Optimizer/Optimize", request_serializer=identity, response_deserializer=identity)
    with pytest.raises(grpc.RpcError) as e:
        list(optimize(b"\xff\xff", timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "slimserve.v1.OptimizeRequest" in e.value.details()
    assert fuzz_server.server.repository.names() == ["digits", "echo"]


def test_oversize_messages_are_resource_exhausted_and_the_server_carries_on(server_factory, digits):
    server = server_factory(max_message_bytes=1 << 20)
    with SlimServeClient(server.address, max_message_bytes=64 << 20) as c:  # the client would send it; the server must refuse
        c.register("digits", digits.onnx)
        big = np.zeros((5000, 1, 8, 8), np.float32)  # 1.28 MB of raw data
        with pytest.raises(Exception) as e:
            c.infer("digits", {"x": big})
        assert e.value.code == "RESOURCE_EXHAUSTED" and "larger than max" in e.value.message
        assert c.infer("digits", {"x": big[:1000]})[1]["logits"].shape == (1000, 10)


# ------------------------------------------------------------------ fuzzing


def seeds(digits) -> list[bytes]:
    """Valid requests of every shape the server takes: raw and typed, one input and thirteen, pinned and routed."""
    out = []
    for raw in (True, False):
        r = pb.ModelInferRequest(model_name="digits", id="seed")
        codec.fill_input(r, "x", digits.x_test[:2], raw=raw)
        out.append(r.SerializeToString())
        types = list(ECHO_TYPES) if raw else [t for t in ECHO_TYPES if t != "FP16"]
        r = pb.ModelInferRequest(model_name="echo", model_version="baseline")
        for name, array in echo_arrays(2, types).items():
            codec.fill_input(r, name, array, raw=raw)
        r.outputs.add(name="out_int8")
        codec.set_parameter(r.parameters["binary_data_output"], True)
        out.append(r.SerializeToString())
    return out


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # flip a few bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # overwrite a few bytes
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:  # truncate
        del b[rng.randrange(len(b)) :]
    elif kind == 3:  # insert random bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif kind == 4:  # splice two requests
        other = rng.choice(corpus)
        b = b[: rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1) :]
    else:  # set a varint-looking byte to something large (lengths, shapes)
        i = rng.randrange(len(b))
        b[i : i + 1] = bytes([0xFF] * rng.randint(1, 9) + [0x01])
    return bytes(b)


def test_thousands_of_byte_mutations_of_valid_requests(fuzz_server, raw_infer, digits):
    rng = random.Random(20240607)
    corpus = seeds(digits)
    results: list[tuple[bytes, grpc.StatusCode, str]] = []
    in_flight = []
    for _i in range(4000):
        payload = mutate(rng, rng.choice(corpus), corpus)
        in_flight.append((payload, raw_infer.future(payload, timeout=30)))
        if len(in_flight) >= 32:  # a window of calls in flight: many at once, never unbounded
            results.extend((p, *outcome(f)) for p, f in in_flight)
            in_flight.clear()
    results.extend((p, *outcome(f)) for p, f in in_flight)
    assert_acceptable(results)
    codes = {code for _, code, _ in results}
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.INVALID_ARGUMENT in codes  # the mutations reached both sides
    assert_serves_correctly(fuzz_server, digits)


DATATYPES = [*codec.DATATYPE_TO_NUMPY, "", "FP8", "fp32", "STRING"]
dims = st.one_of(st.integers(-3, 9), st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63)]))


@st.composite
def infer_requests(draw) -> bytes:
    r = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["digits", "echo", "", "nope", "../digits", "digits/baseline"]) | st.text(max_size=8)),
        model_version=draw(st.sampled_from(["", "baseline", "..", "nope"])),
        id=draw(st.text(max_size=4)),
    )
    names = ["x", *(f"in_{t.lower()}" for t in ECHO_TYPES), "", "y"]
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):
        datatype = draw(st.sampled_from(DATATYPES))
        tensor = r.inputs.add(name=draw(st.sampled_from(names)), datatype=datatype, shape=draw(st.lists(dims, max_size=5)))
        if raw:
            r.raw_input_contents.append(draw(st.binary(max_size=600)))
        elif draw(st.booleans()):
            field = codec.CONTENTS_FIELD.get(datatype, "fp32_contents")
            values = {
                "bool_contents": st.booleans(),
                "bytes_contents": st.binary(max_size=8),
                "fp32_contents": st.floats(width=32, allow_nan=True),
                "fp64_contents": st.floats(allow_nan=True),
                "uint_contents": st.integers(0, 2**32 - 1),
                "uint64_contents": st.integers(0, 2**64 - 1),
                "int_contents": st.integers(-(2**31), 2**31 - 1),
                "int64_contents": st.integers(-(2**63), 2**63 - 1),
            }[field]
            getattr(tensor.contents, field).extend(draw(st.lists(values, max_size=80)))
    if draw(st.booleans()):
        r.raw_input_contents.append(draw(st.binary(max_size=8)))  # one entry too many, sometimes
    for name in draw(st.lists(st.sampled_from(["logits", "out_fp32", "nope", ""]), max_size=2)):
        r.outputs.add(name=name)
    if draw(st.booleans()):
        codec.set_parameter(
            r.parameters[draw(st.sampled_from(["binary_data_output", "user_id"]))],
            draw(st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=4))),
        )
    return r.SerializeToString()


def test_generated_requests_get_ok_or_a_precise_refusal(fuzz_server, raw_infer, digits):
    results: list[tuple[bytes, grpc.StatusCode, str]] = []

    @settings(
        max_examples=1500,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
    @given(infer_requests())
    def check(payload: bytes) -> None:
        code, message = send(raw_infer, payload)
        results.append((payload, code, message))
        assert code in ACCEPTABLE and (code == grpc.StatusCode.OK or message), (code, message)

    check()
    assert len(results) >= 1500
    assert_serves_correctly(fuzz_server, digits)
