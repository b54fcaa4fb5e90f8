"""slimserve.v1.ModelRegistry: chunked upload, list, get, delete."""

from __future__ import annotations

from protos import slimserve_pb2 as spb
from protos import slimserve_pb2_grpc as spb_grpc
from server import converters
from server.dataplane import DataPlane
from server.edge import grpc_errors
from server.errors import AlreadyExists, InvalidArgument, NotFound
from server.jobs import JobManager
from server.registry import Registrar, check_header


class RegistryServicer(spb_grpc.ModelRegistryServicer):
    def __init__(self, dataplane: DataPlane, registrar: Registrar, jobs: JobManager) -> None:
        self.dataplane = dataplane
        self.registrar = registrar
        self.jobs = jobs

    @grpc_errors
    async def Register(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("a Register stream starts with a RegisterHeader message")
        header = converters.upload_header(first.header)
        check_header(header, self.registrar.max_upload_bytes)

        async def chunks():
            async for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only FileChunk messages may follow the RegisterHeader")
                yield message.chunk.file_index, message.chunk.data

        repository = self.dataplane.repository
        if header.name in repository.names():
            raise AlreadyExists(f"model '{header.name}' is already registered; delete it first or pick another name")
        with repository.staging() as staged:
            paths = await self.registrar.receive(header, chunks(), staged)
            info = await self.dataplane.run_blocking(self.registrar.commit, header, paths, staged)
        await self.dataplane.load_model(info.name)
        self.jobs.evaluate_in_background(info.name)
        return converters.model_record(info)

    @grpc_errors
    async def ListModels(self, request, context):
        return spb.ListModelsResponse(models=[converters.model_record(i) for i in self.dataplane.repository.list()])

    @grpc_errors
    async def GetModel(self, request, context):
        return converters.model_record(self.dataplane.repository.get(request.name))

    @grpc_errors
    async def DeleteModel(self, request, context):
        self.dataplane.repository.get(request.name)  # NotFound before anything changes
        self.dataplane.repository.check_writable()  # a read-only replica refuses before it unloads anything
        try:
            await self.dataplane.unload_model(request.name)
        except NotFound:
            pass  # registered but not loaded
        self.dataplane.repository.delete(request.name)
        self.dataplane.forget_model(request.name)
        return spb.DeleteModelResponse()

    @grpc_errors
    async def DeleteVariant(self, request, context):
        """Out of routing and the manifest first (new requests stop going there), then unloaded once its queue drains."""
        repository = self.dataplane.repository
        info = await self.dataplane.run_blocking(repository.remove_variant, request.model, request.variant)
        if request.model in self.dataplane.models:
            await self.dataplane.refresh(request.model)
        self.dataplane.forget_variant(request.model, request.variant)
        return converters.model_record(info)
