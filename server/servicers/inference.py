"""inference.GRPCInferenceService: the Open Inference Protocol, plus its model repository extension."""

from __future__ import annotations

import asyncio
import logging

import grpc

from client import codec
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from server import __version__, converters
from server.dataplane import DataPlane
from server.edge import grpc_errors, status_of
from server.errors import NotFound


log = logging.getLogger(__name__)

# Requests of one ModelStreamInfer stream that run at once; more wait unread in the stream.
STREAM_IN_FLIGHT = 256
_END = object()


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    @grpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    @grpc_errors
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dataplane.is_ready(request.name, request.version))

    @grpc_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="slimserve", version=__version__, extensions=["model_repository"])

    @grpc_errors
    async def ModelMetadata(self, request, context):
        loaded, variant, runtime = self.dataplane.resolve(request.name, request.version)
        return converters.model_metadata(
            request.name, list(loaded.runtimes), loaded.info.variants[variant].runtime, runtime.inputs, runtime.outputs
        )

    @grpc_errors
    async def ModelInfer(self, request, context):
        return await self._infer(request)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        async with self.dataplane.track(request.model_name, request.model_version, request.parameters, request.id) as call:
            inputs = codec.decode_request_inputs(request)
            result = await self.dataplane.infer(call, inputs, [o.name for o in request.outputs] or None)
            return converters.infer_response(request, result)

    @grpc_errors
    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming API: every request is answered on the stream as soon as its answer is ready.

        Requests run concurrently (so they batch with each other and with unary calls); at most
        STREAM_IN_FLIGHT per stream are running or answered but not yet written, beyond which the
        stream is not read and HTTP/2 flow control holds the client back (a client that sends
        without reading the answers cannot grow the server's memory). A request that fails is
        answered with its error and the stream goes on; a message that does not parse ends the
        stream with INVALID_ARGUMENT.
        """
        answers: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._infer(request)))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                code, message = status_of(e)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("ModelStreamInfer request failed", exc_info=e)
                failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
                answers.put_nowait(pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=failed))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.get_running_loop().create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running, return_exceptions=True)
                answers.put_nowait(_END)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a malformed message, or the stream broke: the writer ends the stream with its status
                answers.put_nowait(e)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                item = await answers.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                slots.release()  # written: the next request may be read
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    @grpc_errors
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for info in self.dataplane.repository.list():
            loaded = self.dataplane.models.get(info.name)
            for variant, v in info.variants.items():
                ready = loaded is not None and variant in loaded.runtimes
                if request.ready and not ready:
                    continue
                reason = v.message if v.status == "failed" else ("" if ready else "not loaded")
                response.models.add(name=info.name, version=variant, state="READY" if ready else "UNAVAILABLE", reason=reason)
        return response

    @grpc_errors
    async def RepositoryModelLoad(self, request, context):
        await self.dataplane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, request, context):
        if request.model_name not in self.dataplane.models:
            self.dataplane.repository.get(request.model_name)  # NotFound when not registered at all
            raise NotFound(f"model '{request.model_name}' is registered but not loaded")
        await self.dataplane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
