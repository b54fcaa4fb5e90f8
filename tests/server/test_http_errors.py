"""The REST port's errors, token and TLS: bad bodies answer 400 with a precise JSON error and the server keeps serving."""

from __future__ import annotations

import json
import ssl

import grpc
import pytest

from slimserve.server.errors import HTTP_STATUS, ErrorKind
from slimserve.server.grpc.edge import STATUS_OF_KIND
from tests.server.test_http import binary_request, call, post_json
from tests.server.test_tls import Pki, pki  # noqa: F401 - the fixture, used by name

TOKEN = "rest-token-0123456789"
X = {"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8]}

# The HTTP status Triton and KServe answer for each gRPC code.
HTTP_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
}


def test_every_error_kind_has_the_http_status_of_its_grpc_code():
    for kind in ErrorKind:
        assert HTTP_STATUS[kind] == HTTP_OF_GRPC[STATUS_OF_KIND[kind]], kind


@pytest.fixture
def rest(server, client, digits):
    client.register("digits", digits.onnx, data=digits.data)
    return server


def error_of(address: str, path: str, body: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    status, response_headers, response = call(address, "POST", path, body, headers)
    assert response_headers["Content-Type"].startswith("application/json")
    return status, json.loads(response)["error"]


def with_data(data, **fields) -> str:
    return json.dumps({"inputs": [{**X, **fields, "data": data}]})


BAD_BODIES = [
    ("{not json", "the inference request is not valid JSON"),
    ("[1, 2]", "the inference request must be a JSON object, got list"),
    ('{"inputs": 3}', "the inference request: 'inputs' must be list, got int"),
    ('{"inputs": [{"name": "x", "datatype": "FP32"}]}', "input 'x': 'shape' is missing"),
    ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, "8"]}]}', "input 'x': 'shape' must be a list of integers"),
    ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', "input 'x' has neither 'data' nor a 'binary_data_size'"),
    (
        with_data([0.5] * 64, parameters={"shared_memory_region": "r", "shared_memory_byte_size": 256}),
        "input 'x' sets 'data' and 'shared_memory_region': send its values one way only",
    ),
    (
        json.dumps({"inputs": [{**X, "parameters": {"shared_memory_region": "r"}}]}),
        "input 'x': shared memory needs 'shared_memory_region' (a string), 'shared_memory_byte_size'",
    ),
    (
        json.dumps({"inputs": [{**X, "parameters": {"shared_memory_region": "nowhere", "shared_memory_byte_size": 256}}]}),
        "shared memory region 'nowhere' is not registered",
    ),
    (
        json.dumps({"inputs": [{**X, "data": [0.5] * 64}], "outputs": [{"name": "logits", "parameters": {"classification": "3"}}]}),
        "requested output 'logits': 'classification' (class_count) must be an integer",
    ),
    (
        json.dumps({"inputs": [{**X, "data": [0.5] * 64}], "outputs": [{"name": "logits", "parameters": {"classification": 11}}]}),
        "output 'logits': class_count 11 is larger than its 10 classes",
    ),
    (
        json.dumps(
            {
                "inputs": [{**X, "data": [0.5] * 64}],
                "outputs": [
                    {"name": "logits", "parameters": {"classification": 2, "shared_memory_region": "r", "shared_memory_byte_size": 8}}
                ],
            }
        ),
        "'shared_memory_region' cannot go with 'classification'",
    ),
    ('{"inputs": [], "parameters": {"p": [1]}}', "parameter 'p' must be a string, number or boolean, got list"),
    (with_data([0.5] * 63), "tensor 'x': shape [1, 1, 8, 8] needs 64 values, got 63 in 'data'"),
    (with_data(["a"] * 64), "tensor 'x': FP32 'data' must hold numbers"),
    (with_data([[1, 2], [3]]), "'data' is not a regular array of values"),
    (with_data([1] * 64, datatype="INT8"), "input 'x': expected FP32 [-1,1,8,8], got INT8 [1,1,8,8]"),
    (with_data([300] * 64, datatype="INT8"), "a value in 'data' is out of range for INT8"),
    (with_data([1.5] * 64, datatype="INT32"), "INT32 'data' must hold integers"),
    (with_data([0.5] * 2, shape=[1, 2]), "input 'x': expected FP32 [-1,1,8,8], got FP32 [1,2]"),
    (with_data([0.5], datatype="FP8"), "tensor 'x': unknown datatype 'FP8'"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES, ids=[m[:40] for _, m in BAD_BODIES])
def test_a_bad_json_body_is_400_with_a_precise_message(rest, digits, body, message):
    status, error = error_of(rest.http_address, "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
    assert status == 400 and message in error
    good = {"inputs": [{**X, "data": digits.x_test[:1].reshape(-1).tolist()}]}
    assert post_json(rest.http_address, "/v2/models/digits/infer", good)[0] == 200  # the server keeps serving


def test_binary_sizes_that_disagree_with_the_header_are_400(rest, digits):
    x = digits.x_test[:1].tobytes()
    header = {"inputs": [{**X, "parameters": {"binary_data_size": len(x)}}]}
    body, headers = binary_request(header, x + b"extra")
    assert error_of(rest.http_address, "/v2/models/digits/infer", body, headers) == (
        400,
        "the inputs' binary_data_size add up to 256 bytes but 261 follow the JSON header",
    )
    body, headers = binary_request(header, x[:-1])
    status, error = error_of(rest.http_address, "/v2/models/digits/infer", body, headers)
    assert status == 400 and "binary_data_size 256 at offset 0 runs past the 255 bytes after the JSON header" in error
    status, error = error_of(rest.http_address, "/v2/models/digits/infer", body, {"Inference-Header-Content-Length": "99999"})
    assert status == 400 and "Inference-Header-Content-Length is 99999 but the body holds" in error
    status, error = error_of(rest.http_address, "/v2/models/digits/infer", body, {"Inference-Header-Content-Length": "ten"})
    assert status == 400 and "must be a byte count, got 'ten'" in error
    header["inputs"][0]["parameters"]["binary_data_size"] = 252  # agrees with the framing, not with the shape
    body, headers = binary_request(header, x[:252])
    status, error = error_of(rest.http_address, "/v2/models/digits/infer", body, headers)
    assert status == 400 and "tensor 'x': FP32 [1, 1, 8, 8] needs 256 bytes of raw data, got 252" in error
    body, headers = binary_request({"inputs": [{**X, "parameters": {"binary_data_size": len(x)}}]}, x)
    assert call(rest.http_address, "POST", "/v2/models/digits/infer", body, headers)[0] == 200


def test_shared_memory_registration_refusals_change_nothing(rest):
    address = rest.http_address
    for body, text in [
        ("{not json", "the register request is not valid JSON"),
        ('{"offset": 0, "byte_size": 64}', "the register request: 'key' is missing"),
        ('{"key": "/k", "byte_size": "64"}', "the register request: 'byte_size' must be int, got str"),
        ('{"key": "/slimserve_no_such_key", "byte_size": 64}', "shared memory key '/slimserve_no_such_key' cannot be opened"),
        ('{"key": "/../etc/passwd", "byte_size": 8}', "is not a POSIX shared memory name"),
    ]:
        status, error = error_of(address, "/v2/systemsharedmemory/region/r/register", body)
        assert status == 400 and text in error, error
    status, _, body = call(address, "GET", "/v2/systemsharedmemory/region/r/status")
    assert status == 404 and json.loads(body)["error"] == "shared memory region 'r' is not registered"
    assert json.loads(call(address, "GET", "/v2/systemsharedmemory/status")[2]) == []


def test_a_refused_tensor_counts_as_the_variants_invalid_argument(rest):
    labels = {"model": "digits", "variant": "baseline", "node_type": "cpu", "code": "INVALID_ARGUMENT"}
    error_of(rest.http_address, "/v2/models/digits/infer", with_data([0.5] * 63))
    assert rest.metrics.registry.get_sample_value("slimserve_requests_total", labels) == 1


def test_unknown_paths_methods_and_models(rest):
    status, _, body = call(rest.http_address, "GET", "/v2/nothing/here")
    assert status == 404 and "GET /v2/nothing/here" in json.loads(body)["error"]
    status, _, body = call(rest.http_address, "GET", "/v2/models/digits/infer")
    assert status == 405 and json.loads(body)["error"]
    status, error = error_of(rest.http_address, "/v2/models/nope/infer", with_data([0.5] * 64))
    assert status == 404 and error == "Request for unknown model: 'nope' is not registered"
    status, error = error_of(rest.http_address, "/v2/models/digits/versions/v9/infer", with_data([0.5] * 64))
    assert status == 404 and "v9" in error


def test_a_body_past_the_message_limit_is_413(server_factory):
    server = server_factory(max_message_bytes=1024)
    status, error = error_of(server.http_address, "/v2/models/digits/infer", "[" + "0," * 2000 + "0]")
    assert status == 413 and "1024" in error


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_the_token_protects_what_it_protects_over_grpc(server_factory, token_file, tmp_path):
    server = server_factory(token_file=token_file)
    address, bearer = server.http_address, {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/v2/repository/models/digits/load", "/v2/repository/models/digits/unload"):
        status, headers, body = call(address, "POST", path, "{}")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert "missing 'authorization: Bearer <token>' header" in json.loads(body)["error"]
    status, answer = post_json(address, "/v2/repository/models/digits/load", {}, {"Authorization": "Bearer wrong"})
    assert status == 401 and "the bearer token is wrong" in answer["error"]
    status, answer = post_json(address, "/v2/repository/models/digits/load", {}, bearer)
    assert status == 404 and "not registered" in answer["error"]  # past the token, to the domain's answer
    assert post_json(address, "/v2/repository/index", {})[0] == 200  # open over gRPC too
    assert call(address, "GET", "/v2")[0] == 200 and call(address, "GET", "/v2/health/ready")[0] == 200
    assert error_of(address, "/v2/models/digits/infer", with_data([0.5] * 64))[0] == 404  # inference stays open

    protected = server_factory(tmp_path / "protected", token_file=token_file, protect_inference=True)
    assert error_of(protected.http_address, "/v2/models/digits/infer", with_data([0.5] * 64))[0] == 401
    assert call(protected.http_address, "GET", "/v2/models/digits")[0] == 401
    assert call(protected.http_address, "GET", "/v2/health/live")[0] == 200  # probes stay open, as grpc.health.v1 does
    assert error_of(protected.http_address, "/v2/models/digits/infer", with_data([0.5] * 64), bearer)[0] == 404


def test_https_with_the_grpc_ports_certificate_and_mutual_tls(server_factory, pki: Pki, tmp_path):  # noqa: F811 - the fixture
    server = server_factory(tls_cert=pki.server_cert, tls_key=pki.server_key)
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    assert call(server.http_address, "GET", "/v2/health/live", context=trusting)[0] == 200
    with pytest.raises(ssl.SSLError):  # a client that does not trust the CA
        call(server.http_address, "GET", "/v2/health/live", context=ssl.create_default_context())

    mutual = server_factory(tmp_path / "mutual", tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca)
    known = ssl.create_default_context(cafile=str(pki.ca))
    known.load_cert_chain(pki.client_cert, pki.client_key)
    assert call(mutual.http_address, "GET", "/v2/health/live", context=known)[0] == 200
    stranger = ssl.create_default_context(cafile=str(pki.ca))
    stranger.load_cert_chain(pki.stranger_cert, pki.stranger_key)
    for context in (trusting, stranger):  # no client certificate, or one an unknown CA signed
        with pytest.raises((ssl.SSLError, ConnectionError)):
            call(mutual.http_address, "GET", "/v2/health/live", context=context)
