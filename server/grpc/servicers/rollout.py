"""slimserve.v1.Rollout: start, status, abort and watch a model's rollout (server/rollout/controller.py)."""

from __future__ import annotations

from slimserve.protos import slimserve_pb2_grpc as spb_grpc
from slimserve.server.grpc import converters
from slimserve.server.grpc.edge import grpc_errors
from slimserve.server.rollout.controller import RolloutController


class RolloutServicer(spb_grpc.RolloutServicer):
    def __init__(self, rollouts: RolloutController) -> None:
        self.rollouts = rollouts

    @grpc_errors
    async def Start(self, request, context):
        plan = converters.rollout_plan(request)
        return converters.rollout_status(await self.rollouts.start(request.model, request.variant, plan))

    @grpc_errors
    async def Status(self, request, context):
        return converters.rollout_status(self.rollouts.status(request.model))

    @grpc_errors
    async def Abort(self, request, context):
        return converters.rollout_status(await self.rollouts.abort(request.model))

    @grpc_errors
    async def Watch(self, request, context):
        async for state in self.rollouts.watch(request.model):
            yield converters.rollout_status(state)
