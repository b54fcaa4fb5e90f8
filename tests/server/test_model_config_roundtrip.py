"""ModelConfig round trip: a config fetched with get_model_config and sent back to load_model is accepted, its `parameters`
included, and a changed intra_op_thread_count is applied to the variant's ONNX Runtime session.

The JSON is what tritonclient's get_model_config(as_json=True) makes of the message (MessageToJson with the proto's
field names); tritonclient itself runs only in a subprocess in this suite (its protos share our package names)."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import json_format

from slimserve.client.client import SlimServeClient
from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc


def test_a_fetched_config_loads_back_and_a_changed_thread_count_is_applied(server_factory, digits):
    server = server_factory(intra_op_threads=1)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

        def fetch() -> dict:
            message = stub.ModelConfig(pb.ModelConfigRequest(name="digits"), timeout=30).config
            return json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))

        def load(config: dict) -> None:
            request = pb.RepositoryModelLoadRequest(model_name="digits")
            request.parameters["config"].string_param = json.dumps(config)
            stub.RepositoryModelLoad(request, timeout=60)

        config = fetch()
        assert config["parameters"]["intra_op_thread_count"] == {"string_value": "1"}
        load(config)  # as fetched: accepted unchanged
        config["parameters"]["intra_op_thread_count"]["string_value"] = "2"
        load(config)
        assert fetch()["parameters"]["intra_op_thread_count"] == {"string_value": "2"}
        assert server.server.dataplane.models["digits"].variants["baseline"].runtime.intra_op_threads == 2
        config["parameters"]["inter_op_thread_count"] = {"string_value": "2"}
        with pytest.raises(grpc.RpcError) as e:
            load(config)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameter 'inter_op_thread_count' is not supported (supported: intra_op_thread_count)" in e.value.details()


def test_a_config_fetched_over_rest_with_every_default_written_loads_back(server_factory, digits):
    import urllib.request

    server = server_factory()
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
    base = f"http://{server.http_address}/v2"
    with urllib.request.urlopen(f"{base}/models/digits/config", timeout=30) as answer:
        config = json.loads(answer.read())
    assert config["input"][0]["optional"] is False and config["model_warmup"] == []  # Triton's JSON: defaults written
    config["max_batch_size"] = 4
    body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
    request = urllib.request.Request(f"{base}/repository/models/digits/load", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.status == 200
    assert server.server.control.model_config("digits").max_batch_size == 4
