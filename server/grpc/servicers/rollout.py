"""slimserve.v1.Rollout: start, status, abort and watch a model's rollout (server/rollout/controller.py)."""

from __future__ import annotations

from slimserve.protos import slimserve_pb2_grpc as spb_grpc
from slimserve.server.errors import FailedPrecondition, NotFound
from slimserve.server.grpc import converters
from slimserve.server.grpc.edge import grpc_errors
from slimserve.server.rollout.controller import RolloutController
from slimserve.server.rollout.slo_controller import SloController


class RolloutServicer(spb_grpc.RolloutServicer):
    def __init__(self, rollouts: RolloutController, slo: SloController | None = None) -> None:
        self.rollouts = rollouts
        self.slo = slo

    @grpc_errors
    async def Start(self, request, context):
        plan = converters.rollout_plan(request)
        return converters.rollout_status(await self.rollouts.start(request.model, request.variant, plan))

    @grpc_errors
    async def Status(self, request, context):
        return converters.rollout_status(self.rollouts.status(request.model), self._objective(request.model))

    @grpc_errors
    async def Abort(self, request, context):
        return converters.rollout_status(await self.rollouts.abort(request.model))

    @grpc_errors
    async def Watch(self, request, context):
        async for state in self.rollouts.watch(request.model):
            yield converters.rollout_status(state, self._objective(request.model))

    @grpc_errors
    async def SetSlo(self, request, context):
        if request.clear:
            return converters.slo_status(await self._slo().clear(request.model))
        return converters.slo_status(self._slo().set(request.model, request.p99_ms, request.max_drop_pt))

    @grpc_errors
    async def GetSlo(self, request, context):
        return converters.slo_status(self._slo().status(request.model))

    @grpc_errors
    async def WatchSlo(self, request, context):
        async for state in self._slo().watch(request.model):
            yield converters.slo_status(state)

    def _objective(self, model: str):
        """The model's latency objective on record, or None: its shifts are shown with the rollout's status."""
        if self.slo is None:
            return None
        try:
            return self.slo.status(model)
        except NotFound:
            return None

    def _slo(self) -> SloController:
        if self.slo is None:
            raise FailedPrecondition("this server is a read-only replica: set latency objectives on the writer")
        return self.slo
