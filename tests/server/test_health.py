"""Standard services: gRPC health (overall and per service), reflection, message size limit."""

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from slimserve.client.client import SlimServeClient, SlimServeClientError


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService", "slimserve.v1.ModelRegistry", "slimserve.v1.Optimizer"])
def test_health_serving(server, service):
    with grpc.insecure_channel(server.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service(server):
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "slimserve.v1.ModelRegistry", "slimserve.v1.Optimizer", "grpc.health.v1.Health"} <= names


def test_oversize_message_refused_and_server_keeps_serving(server_factory, digits):
    server = server_factory(max_message_bytes=2 * 1024 * 1024)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
        with pytest.raises(SlimServeClientError) as e:
            c.infer("digits", {"x": np.zeros((10_000, 1, 8, 8), np.float32)})
        assert e.value.code == "RESOURCE_EXHAUSTED"
        assert c.infer("digits", {"x": digits.x_test[:4]})[0] == "baseline"
