"""slimserve.v1.Feedback and slimserve.v1.Experiments: ground truth for live requests, and the A/B comparison."""

from __future__ import annotations

from slimserve.protos import slimserve_pb2_grpc as spb_grpc
from slimserve.server.grpc import converters
from slimserve.server.grpc.edge import grpc_errors
from slimserve.server.management.control import Control


class FeedbackServicer(spb_grpc.FeedbackServicer):
    def __init__(self, control: Control) -> None:
        self.control = control

    @grpc_errors
    async def SendFeedback(self, request, context):
        row = request.row if request.HasField("row") else None
        label = None if request.labels else request.label
        return converters.feedback_response(
            await self.control.feedback(request.model, request.request_id, label, list(request.labels), row)
        )


class ExperimentsServicer(spb_grpc.ExperimentsServicer):
    def __init__(self, control: Control) -> None:
        self.control = control

    @grpc_errors
    async def Compare(self, request, context):
        return converters.compare_response(await self.control.compare(request.model))
