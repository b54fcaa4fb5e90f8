"""slimserve.v1.Traffic: a model's routing — weights, shadows, sticky parameter, promote and rollback (server/management/control.py)."""

from __future__ import annotations

from slimserve.protos import slimserve_pb2_grpc as spb_grpc
from slimserve.server.grpc import converters
from slimserve.server.grpc.edge import grpc_errors
from slimserve.server.management.control import Control


class TrafficServicer(spb_grpc.TrafficServicer):
    def __init__(self, control: Control) -> None:
        self.control = control

    @grpc_errors
    async def SetTraffic(self, request, context):
        policy = await self.control.set_traffic(
            request.model, dict(request.weights), list(request.shadows), request.sticky_parameter or None
        )
        return converters.traffic_policy(request.model, policy)

    @grpc_errors
    async def GetTraffic(self, request, context):
        return converters.traffic_policy(request.model, self.control.get_traffic(request.model))

    @grpc_errors
    async def Promote(self, request, context):
        return converters.traffic_policy(request.model, await self.control.promote(request.model, request.variant))

    @grpc_errors
    async def Rollback(self, request, context):
        return converters.traffic_policy(request.model, await self.control.rollback(request.model))
