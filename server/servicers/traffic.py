"""slimserve.v1.Traffic: a model's routing — weights, shadows, sticky parameter, promote and rollback.

A change is checked against the variants loaded now, written to the manifest (so it survives a
restart), then the model's router is swapped; requests already routed keep their variant.
"""

from __future__ import annotations

from collections.abc import Callable

from protos import slimserve_pb2 as spb
from protos import slimserve_pb2_grpc as spb_grpc
from server import converters
from server.dataplane import DataPlane
from server.edge import grpc_errors
from server.repository import ModelInfo
from server.routing import TrafficPolicy, promote, rollback, set_traffic


class TrafficServicer(spb_grpc.TrafficServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def _change(self, model: str, change: Callable[..., TrafficPolicy]) -> spb.TrafficPolicy:
        loaded = self.dataplane.loaded_model(model)  # NotFound / Unavailable before anything changes
        ready = set(loaded.variants)

        def apply(info: ModelInfo) -> None:
            statuses = {name: v.status for name, v in info.variants.items()}
            info.traffic = change(info.traffic, variants_ready=ready, model=model, statuses=statuses)

        info = await self.dataplane.run_blocking(self.dataplane.repository.update, model, apply)
        await self.dataplane.refresh(model)
        return converters.traffic_policy(model, info.traffic)

    @grpc_errors
    async def SetTraffic(self, request, context):
        weights = dict(request.weights)
        shadows = list(request.shadows)
        sticky = request.sticky_parameter or None
        return await self._change(request.model, lambda current, **kw: set_traffic(current, weights, shadows, sticky, **kw))

    @grpc_errors
    async def GetTraffic(self, request, context):
        return converters.traffic_policy(request.model, self.dataplane.repository.get(request.model).traffic)

    @grpc_errors
    async def Promote(self, request, context):
        return await self._change(request.model, lambda current, **kw: promote(current, request.variant, **kw))

    @grpc_errors
    async def Rollback(self, request, context):
        return await self._change(request.model, lambda current, **kw: rollback(current, **kw))
