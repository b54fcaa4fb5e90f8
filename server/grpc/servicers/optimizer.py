"""slimserve.v1.Optimizer: start a job, stream its progress, end with the new variant and its report; list and cancel jobs; list passes."""

from __future__ import annotations

from slimserve.protos import slimserve_pb2_grpc as spb_grpc
from slimserve.server.grpc import converters
from slimserve.server.grpc.edge import grpc_errors
from slimserve.server.management.control import Control


class OptimizerServicer(spb_grpc.OptimizerServicer):
    def __init__(self, control: Control) -> None:
        self.control = control

    @grpc_errors
    async def Optimize(self, request, context):
        async for job_id, event in self.control.optimize(converters.job_request(request)):
            yield converters.optimize_event(job_id, event)

    @grpc_errors
    async def ListJobs(self, request, context):
        return converters.job_list(self.control.list_jobs(request.model))

    @grpc_errors
    async def ListPasses(self, request, context):
        return converters.pass_list(await self.control.list_passes(request.name))

    @grpc_errors
    async def CancelJob(self, request, context):
        return converters.job_record(*await self.control.cancel_job(request.id))
