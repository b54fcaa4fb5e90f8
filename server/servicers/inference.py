"""inference.GRPCInferenceService: the Open Inference Protocol, plus its model repository extension."""

from __future__ import annotations

from client import codec
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from server import __version__, converters
from server.dataplane import DataPlane
from server.edge import grpc_errors
from server.errors import NotFound


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

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
        loaded, variant, runtime = self.dataplane.resolve(request.name, request.version)
        return converters.model_metadata(
            request.name, list(loaded.runtimes), loaded.info.variants[variant].runtime, runtime.inputs, runtime.outputs
        )

    @grpc_errors
    async def ModelInfer(self, request, context):
        async with self.dataplane.track(request.model_name, request.model_version, request.parameters, request.id) as call:
            inputs = codec.decode_request_inputs(request)
            result = await self.dataplane.infer(call, inputs, [o.name for o in request.outputs] or None)
            return converters.infer_response(request, result)

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for info in self.dataplane.repository.list():
            loaded = self.dataplane.models.get(info.name)
            for variant, v in info.variants.items():
                ready = loaded is not None and variant in loaded.runtimes
                if request.ready and not ready:
                    continue
                reason = v.message if v.status == "failed" else ("" if ready else "not loaded")
                response.models.add(name=info.name, version=variant, state="READY" if ready else "UNAVAILABLE", reason=reason)
        return response

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        await self.dataplane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        if request.model_name not in self.dataplane.models:
            self.dataplane.repository.get(request.model_name)  # NotFound when not registered at all
            raise NotFound(f"model '{request.model_name}' is registered but not loaded")
        await self.dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
