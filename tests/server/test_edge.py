"""server/grpc/edge.py: how servicers' methods reach grpc (one generic handler, checked decoding)."""

from __future__ import annotations

import grpc

from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc as pb_grpc
from slimserve.server.grpc.edge import CheckedDecoding, MalformedRequest


class RecordingServer:
    """Stands in for grpc.aio.Server: records what is added to it."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: dict[str, dict] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.registered[service] = handlers


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_registered_methods_are_served_by_the_first_generic_handler():
    # grpc aio waits on one pending task per registered method for every call that arrives: none may be registered.
    server = RecordingServer()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(pb_grpc.GRPCInferenceServiceServicer(), CheckedDecoding(server))
    assert server.registered == {}
    table = server.generic[0]
    infer = table.service(Details("/inference.GRPCInferenceService/ModelInfer"))
    assert infer is not None and not infer.request_streaming and not infer.response_streaming
    stream = table.service(Details("/inference.GRPCInferenceService/ModelStreamInfer"))
    assert stream is not None and stream.request_streaming and stream.response_streaming
    assert table.service(Details("/inference.GRPCInferenceService/NoSuchMethod")) is None
    # The table's handlers decode with the checked decoder: bytes that do not parse become a MalformedRequest.
    bad = infer.request_deserializer(b"\xff\xff\xff")
    assert isinstance(bad, MalformedRequest) and "inference.ModelInferRequest" in bad.message
    good = infer.request_deserializer(pb.ModelInferRequest(model_name="m").SerializeToString())
    assert good.model_name == "m"


def test_the_server_registers_no_method_with_grpc(monkeypatch, tmp_path):
    # Every service the server offers, reflection and health included, goes through CheckedDecoding's table.
    import asyncio

    from grpc_health.v1 import health

    from slimserve.server.app import SlimServer
    from slimserve.server.settings import Settings

    registered: list[str] = []
    monkeypatch.setattr(
        grpc.aio._server.Server, "add_registered_method_handlers", lambda self, service, handlers: registered.append(service)
    )

    async def build() -> None:
        app = SlimServer(Settings(repository=tmp_path / "repo", grpc_port=0, http_port=-1, metrics_port=-1))
        app.health = health.aio.HealthServicer()
        await app._build_server().stop(None)

    asyncio.run(build())
    assert registered == []
