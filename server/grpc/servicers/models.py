"""slimserve.v1.ModelRegistry: chunked upload, list, get, delete."""

from __future__ import annotations

from slimserve.protos import slimserve_pb2_grpc as spb_grpc
from slimserve.server.grpc import converters
from slimserve.server.grpc.edge import grpc_errors
from slimserve.server.management.control import Control


class RegistryServicer(spb_grpc.ModelRegistryServicer):
    def __init__(self, control: Control) -> None:
        self.control = control

    @grpc_errors
    async def Register(self, request_iterator, context):
        header, chunks = await converters.upload(request_iterator)
        return converters.model_record(await self.control.register(header, chunks))

    @grpc_errors
    async def ListModels(self, request, context):
        return converters.model_list(self.control.list_models())

    @grpc_errors
    async def GetModel(self, request, context):
        return converters.model_record(self.control.get_model(request.name))

    @grpc_errors
    async def DeleteModel(self, request, context):
        await self.control.delete_model(request.name)
        return converters.model_deleted()

    @grpc_errors
    async def DeleteVariant(self, request, context):
        return converters.model_record(await self.control.delete_variant(request.model, request.variant))
