"""slimserve.v1.Optimizer: start a job, stream its progress, end with the new variant and its report."""

from __future__ import annotations

from protos import slimserve_pb2 as spb
from protos import slimserve_pb2_grpc as spb_grpc
from server import converters
from server.edge import grpc_errors
from server.jobs import JobManager, JobRequest


class OptimizerServicer(spb_grpc.OptimizerServicer):
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs

    @grpc_errors
    async def Optimize(self, request, context):
        job = await self.jobs.submit(
            JobRequest(
                model=request.model,
                recipe=request.recipe,
                recipe_json=request.recipe_json,
                variant_name=request.variant_name,
                accuracy_budget=request.accuracy_budget if request.HasField("accuracy_budget") else None,
                parent=request.parent,
            )
        )
        async for event in self.jobs.events(job):
            yield converters.optimize_event(job.id, event)

    @grpc_errors
    async def ListJobs(self, request, context):
        infos = [self.jobs.repository.get(request.model)] if request.model else self.jobs.repository.list()
        return spb.ListJobsResponse(jobs=[converters.job_record(i.name, j) for i in infos for j in i.jobs.values()])
