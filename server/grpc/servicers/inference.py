"""inference.GRPCInferenceService: the Open Inference Protocol, plus its model repository extension."""

from __future__ import annotations

import time

import grpc

from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc as pb_grpc
from slimserve.server import __version__
from slimserve.server.grpc import converters
from slimserve.server.grpc import triton_converters as converters_triton
from slimserve.server.grpc.edge import MalformedRequest, abort_with, checks_decoding, grpc_errors, refuse_malformed
from slimserve.server.grpc.servicers import stream
from slimserve.server.inference.dataplane import DataPlane, InferRequest, outcome_code
from slimserve.server.management.control import Control

# What ServerMetadata lists on both ports (REST adds binary_tensor_data: server/http/routes.py): perf_analyzer reads
# server-side statistics only when `statistics` is there.
EXTENSIONS = ["classification", "model_repository", "model_configuration", "system_shared_memory", "statistics", "logging", "trace"]


def _sent(response: pb.ModelInferResponse, infer: InferRequest, context: grpc.aio.ServicerContext | None) -> pb.ModelInferResponse:
    """The encoded answer of `infer`; for a request with a deadline its variant learns when it left (`on_sent`): a unary
    call's once gRPC finished it (its done callback), a stream message's now (its send is the stream's)."""
    if infer.on_sent is not None:
        if context is None:
            infer.on_sent()
        else:
            context.add_done_callback(infer.on_sent)
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, control: Control) -> None:
        self.dataplane = dataplane
        self.control = control

    @grpc_errors
    async def ServerLive(self, request, context):
        return converters.server_live(True)

    @grpc_errors
    async def ServerReady(self, request, context):
        return converters.server_ready(self.dataplane.ready)

    @grpc_errors
    async def ModelReady(self, request, context):
        return converters.model_ready(self.dataplane.is_ready(request.name, request.version))

    @grpc_errors
    async def ServerMetadata(self, request, context):
        return converters.server_metadata(self.control.server_name, __version__, EXTENSIONS)

    @grpc_errors
    async def ModelMetadata(self, request, context):
        return converters.model_metadata(self.dataplane.metadata(request.name, request.version))

    @checks_decoding
    async def ModelInfer(self, request, context):
        # What checked_handler and @grpc_errors would wrap around it, written inline, and the body of _infer rather
        # than a call to it: one coroutine a request instead of four (python -m bench.bench_hotpath).
        if type(request) is MalformedRequest:
            await refuse_malformed(context, request)
        try:
            infer = converters.infer_request(request)
            remaining = context.time_remaining()
            if remaining is not None:  # the client's deadline, honoured in the queue (batcher.py)
                infer.deadline = time.perf_counter() + remaining
            if self.dataplane.tracer is None:
                response = converters.infer_response(await self.dataplane.serve(infer))
                if infer.on_sent is not None:  # a request with a deadline: its variant learns when the answer left
                    context.add_done_callback(infer.on_sent)
                return response
            return await self._traced(request, context, infer)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, context, "InferenceServicer.ModelInfer")

    async def _traced(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None, infer: InferRequest | None = None
    ) -> pb.ModelInferResponse:
        """ModelInfer with tracing on: the request is traced when the settings sample it, continuing the caller's traceparent."""
        tracer = self.dataplane.tracer
        infer = infer if infer is not None else converters.infer_request(request)
        trace = tracer.begin(request.model_name)
        if trace is None:
            return _sent(converters.infer_response(await self.dataplane.serve(infer)), infer, context)
        if context is not None:
            trace.parent = next((v for k, v in context.invocation_metadata() or () if k == "traceparent"), None)
        code = "OK"
        try:
            infer.trace = trace
            return _sent(converters.infer_response(await self.dataplane.serve(infer)), infer, context)
        except BaseException as e:
            code = outcome_code(e)
            raise
        finally:
            tracer.finish(trace, code)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One request of a ModelStreamInfer stream (traced as a unary one, without a caller's traceparent per message)."""
        if self.dataplane.tracer is not None:
            return await self._traced(request, None)
        infer = converters.infer_request(request)
        return _sent(converters.infer_response(await self.dataplane.serve(infer)), infer, None)

    @grpc_errors
    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming API: every request is answered on the stream as soon as its answer is ready (servicers/stream.py)."""
        async for answer in stream.pump(request_iterator, self._infer):
            yield answer

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        return converters_triton.repository_index(self.control.repository_index(request.ready))

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        config, files = converters_triton.load_parameters(request)
        await self.control.load_model(request.model_name, config, files)
        return converters_triton.model_loaded()

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        await self.control.unload_model(request.model_name)
        return converters_triton.model_unloaded()

    @grpc_errors
    async def ModelConfig(self, request, context):
        return converters_triton.model_config(self.control.model_config(request.name, request.version))

    @grpc_errors
    async def ModelStatistics(self, request, context):
        return converters_triton.model_statistics(self.control.statistics(request.name, request.version))

    @grpc_errors
    async def SystemSharedMemoryStatus(self, request, context):
        return converters_triton.shared_memory_status(self.control.shared_memory_status(request.name))

    @grpc_errors
    async def SystemSharedMemoryRegister(self, request, context):
        self.control.register_shared_memory(request.name, request.key, request.offset, request.byte_size)
        return converters_triton.shared_memory_registered()

    @grpc_errors
    async def SystemSharedMemoryUnregister(self, request, context):
        self.control.unregister_shared_memory(request.name)
        return converters_triton.shared_memory_unregistered()

    @grpc_errors
    async def CudaSharedMemoryStatus(self, request, context):
        self.control.cuda_shared_memory_status(request.name)  # none is ever registered
        return converters_triton.cuda_shared_memory_status()

    @grpc_errors
    async def CudaSharedMemoryRegister(self, request, context):
        self.control.register_cuda_shared_memory(request.name)
        return converters_triton.cuda_shared_memory_registered()

    @grpc_errors
    async def CudaSharedMemoryUnregister(self, request, context):
        self.control.unregister_cuda_shared_memory(request.name)
        return converters_triton.cuda_shared_memory_unregistered()

    @grpc_errors
    async def LogSettings(self, request, context):
        values = converters_triton.log_settings_values(request)
        return converters_triton.log_settings(self.control.update_log_settings(values) if values else self.control.log_settings())

    @grpc_errors
    async def TraceSetting(self, request, context):
        values = converters_triton.trace_settings_values(request)
        if values:
            return converters_triton.trace_settings(self.control.update_trace_settings(values, request.model_name))
        return converters_triton.trace_settings(self.control.trace_settings(request.model_name))
