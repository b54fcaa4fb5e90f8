"""inference.GRPCInferenceService: the Open Inference Protocol, plus its model repository extension."""

from __future__ import annotations

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from server import __version__, converters
from server.control import Control
from server.dataplane import DataPlane
from server.edge import grpc_errors
from server.servicers import stream


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, control: Control) -> None:
        self.dataplane = dataplane
        self.control = control

    @grpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    @grpc_errors
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dataplane.is_ready(request.name, request.version))

    @grpc_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="slimserve", version=__version__, extensions=["model_repository"])

    @grpc_errors
    async def ModelMetadata(self, request, context):
        return converters.model_metadata(self.dataplane.metadata(request.name, request.version))

    @grpc_errors
    async def ModelInfer(self, request, context):
        return await self._infer(request)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return converters.infer_response(request, await self.dataplane.serve(converters.infer_request(request)))

    @grpc_errors
    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming API: every request is answered on the stream as soon as its answer is ready (servicers/stream.py)."""
        async for answer in stream.pump(request_iterator, self._infer):
            yield answer

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        return converters.repository_index(self.control.repository_index(request.ready))

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        await self.control.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        await self.control.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
