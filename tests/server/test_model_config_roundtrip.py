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
