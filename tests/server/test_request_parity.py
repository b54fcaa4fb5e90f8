"""One request parser for both transports: each malformed request of the fuzz corpus (test_fuzz.EXPLICIT, plus the
parameter cases below) is sent over gRPC and over REST, and both must answer with the same error kind and message.

A raw tensor travels as REST's binary tensor extension (`binary_data_size` after the JSON header), a typed one as JSON
`data`. What only one framing can say has its REST counterpart asserted by its own rule (`FRAMING`), and what a URL
path cannot carry is named in `NOT_IN_A_URL`, so that no case of the corpus goes untested."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

from slimserve.client import codec
from slimserve.client.client import SlimServeClient
from slimserve.protos import inference_pb2 as pb
from slimserve.server.errors import HTTP_STATUS, ErrorKind
from tests.server.test_fuzz import EXPLICIT, request

TYPED_FIELD = {"fp32_contents": "'data'", "int_contents": "'data'", "int64_contents": "'data'", "uint_contents": "'data'"}
# Cases whose model or version a URL path cannot carry as gRPC does (empty, "..", NUL): aiohttp routes them elsewhere.
NOT_IN_A_URL = {"empty model name", "path-like model name", "path-like variant", "NUL in model name"}
# gRPC framing rules (raw entries per input, raw beside typed): REST's own framing rule answers its counterpart.
FRAMING = {
    "raw entries != inputs": "the inputs' binary_data_size add up to 0 bytes but 2 follow the JSON header",
    "raw and typed": "input 'x' sets 'data' and 'binary_data_size': send its values one way only",
    # gRPC has no typed field for FP16; REST's JSON carries FP16 numbers, so an empty 'data' is refused by its count
    "FP16 typed": "tensor 'x': shape [1, 1, 8, 8] needs 64 values, got 0 in 'data'",
}


def shm_and_classification() -> pb.ModelInferRequest:
    r = request()
    out = r.outputs.add(name="logits")
    codec.set_parameter(out.parameters["classification"], 2)
    codec.set_parameter(out.parameters["shared_memory_region"], "r")
    codec.set_parameter(out.parameters["shared_memory_byte_size"], 8)
    return r


def negative_shm_size() -> pb.ModelInferRequest:
    r = request(raw=None)
    codec.set_parameter(r.inputs[0].parameters["shared_memory_region"], "r")
    codec.set_parameter(r.inputs[0].parameters["shared_memory_byte_size"], -1)
    return r


def boolean_shm_size() -> pb.ModelInferRequest:
    r = request(raw=None)
    codec.set_parameter(r.inputs[0].parameters["shared_memory_region"], "r")
    codec.set_parameter(r.inputs[0].parameters["shared_memory_byte_size"], True)
    return r


def boolean_class_count() -> pb.ModelInferRequest:
    r = request()
    codec.set_parameter(r.outputs.add(name="logits").parameters["classification"], True)
    return r


RULES = {
    "shared memory with classification": (shm_and_classification(), "INVALID_ARGUMENT", "cannot go with 'classification'"),
    "negative shared-memory size": (negative_shm_size(), "INVALID_ARGUMENT", "shared memory needs"),
    "boolean shared-memory size": (boolean_shm_size(), "INVALID_ARGUMENT", "shared memory needs"),
    "boolean class_count": (boolean_class_count(), "INVALID_ARGUMENT", "(class_count) must be an integer"),
}
CORPUS = {**EXPLICIT, **RULES}


def rest_form(message: pb.ModelInferRequest, case: str) -> tuple[str, bytes, dict[str, str]]:
    """The same request as REST sends it: path, body, headers."""
    raw = list(message.raw_input_contents)
    inputs, binary = [], b""
    for i, tensor in enumerate(message.inputs):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = {k: codec.parameter_value(v) for k, v in tensor.parameters.items()}
        which = tensor.contents.ListFields()
        if not raw and "shared_memory_region" not in params:  # typed: JSON data (BYTES as text)
            values = list(which[0][1]) if which else []
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]
        elif which:
            entry["data"] = list(which[0][1])
        if raw and i < len(raw):
            params["binary_data_size"] = len(raw[i])
            binary += raw[i]
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    if case == "raw entries != inputs":
        binary = b"\0\0"  # two raw entries and no input: bytes nothing claims
    outputs = [{"name": o.name, "parameters": {k: codec.parameter_value(v) for k, v in o.parameters.items()}} for o in message.outputs]
    header = json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {})}).encode()
    version = f"/versions/{message.model_version}" if message.model_version else ""
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return f"/v2/models/{message.model_name}{version}/infer", header + binary, headers


@pytest.fixture(scope="module")
def both(tmp_path_factory, digits, echo_onnx):
    from tests.conftest import ServerHandle

    handle = ServerHandle(tmp_path_factory.mktemp("parity") / "repository")
    with SlimServeClient(handle.address) as c:
        c.register("digits", digits.onnx)
        c.register("echo", echo_onnx)
    with grpc.insecure_channel(handle.address) as channel:
        yield (
            handle,
            channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b, response_deserializer=lambda b: b
            ),
        )
    handle.stop()


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_both_transports_refuse_a_malformed_request_alike(both, case):
    handle, infer = both
    message, code, text = CORPUS[case]
    try:
        infer(message.SerializeToString(), timeout=30)
        raise AssertionError(f"{case}: gRPC accepted it")
    except grpc.RpcError as e:
        grpc_code, grpc_message = e.code().name, e.details()
    assert grpc_code == code and text in grpc_message, grpc_message
    if case in NOT_IN_A_URL:
        return
    path, body, headers = rest_form(message, case)
    try:
        urllib.request.urlopen(urllib.request.Request(f"http://{handle.http_address}{path}", body, headers), timeout=30)
        raise AssertionError(f"{case}: REST accepted it")
    except urllib.error.HTTPError as e:
        status, rest_message = e.code, json.loads(e.read())["error"]
    assert status == HTTP_STATUS[ErrorKind[code]], (status, rest_message)
    if case in FRAMING:
        assert FRAMING[case] in rest_message, rest_message
        return
    expected = grpc_message
    for field, name in TYPED_FIELD.items():  # the one word that differs: where the typed values were
        expected = expected.replace(f"in {field}", f"in {name}")
    assert rest_message == expected
