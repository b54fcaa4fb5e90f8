"""slimserve.v1.Feedback and slimserve.v1.Experiments: ground truth for live requests, and the A/B comparison."""

from __future__ import annotations

from protos import slimserve_pb2 as spb
from protos import slimserve_pb2_grpc as spb_grpc
from server import converters
from server.dataplane import DataPlane
from server.edge import grpc_errors
from server.errors import InvalidArgument, NotFound
from server.stats import compare_rows


class FeedbackServicer(spb_grpc.FeedbackServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    @grpc_errors
    async def SendFeedback(self, request, context):
        if not request.request_id:
            raise InvalidArgument("request_id is empty: send the id of the ModelInferResponse the label is for")
        store = self.dataplane.feedback.get(request.model)
        if store is None:
            self.dataplane.loaded_model(request.model)  # the precise NotFound / Unavailable
            raise NotFound(f"model '{request.model}' has no requests recorded yet")
        result = store.feedback(request.request_id, request.label)
        metrics = self.dataplane.metrics
        labels = metrics.labels(request.model, result.variant)
        metrics.feedback.labels(**labels, correct=str(result.correct).lower()).inc()
        loaded = self.dataplane.models.get(request.model)
        for variant in loaded.variants if loaded is not None else (result.variant,):
            accuracy = store.online_accuracy(variant)
            if accuracy is not None:
                metrics.online_accuracy.labels(**metrics.labels(request.model, variant)).set(accuracy)
        return spb.FeedbackResponse(variant=result.variant, correct=result.correct)


class ExperimentsServicer(spb_grpc.ExperimentsServicer):
    def __init__(self, dataplane: DataPlane, node_type: str, price_per_hour: float) -> None:
        self.dataplane = dataplane
        self.node_type = node_type
        self.price_per_hour = price_per_hour

    @grpc_errors
    async def Compare(self, request, context):
        loaded = self.dataplane.loaded_model(request.model)
        stats = self.dataplane.stats.get(request.model, {})
        policy = loaded.info.traffic
        variants = [v for v in loaded.info.variants if v in loaded.variants]
        rows = compare_rows(
            variants,
            weights=policy.weights,
            shadows=policy.shadows,
            latencies={v: s.window for v, s in stats.items()},
            requests={v: s.requests for v, s in stats.items()},
            errors={v: s.errors for v, s in stats.items()},
            device_seconds={v: s.device_seconds for v, s in stats.items()},
            price_per_hour=self.price_per_hour,
            offline_accuracy={v: loaded.info.variants[v].evaluation.get("accuracy") for v in variants},
            feedback=self.dataplane.feedback.get(request.model),
        )
        for row in rows:
            s = stats.get(row["variant"])
            row["mean_batch"] = s.mean_batch if s is not None else None  # per executed model call, from the batcher
        return converters.compare_response(request.model, self.node_type, self.price_per_hour, rows)
