"""The REST endpoints of the Open Inference Protocol (KServe v2 / Triton): one table of routes, each decode -> one call -> encode.

A handler reads the path and body with server/http/codec.py, makes one DataPlane or Control call, and
encodes what it returns; errors are raised as domain errors and mapped in one place (server/http/server.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from aiohttp import web

from slimserve.server import __version__
from slimserve.server.grpc.servicers.inference import EXTENSIONS as GRPC_EXTENSIONS
from slimserve.server.http import codec, extensions
from slimserve.server.inference.dataplane import DataPlane, outcome_code
from slimserve.server.management.control import Control

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What ServerMetadata lists over gRPC (one list for both ports), and the binary tensor extension only REST has.
EXTENSIONS = [*GRPC_EXTENSIONS, "binary_tensor_data"]
SHM = "/v2/systemsharedmemory"
CUDA_SHM = "/v2/cudasharedmemory"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    # The GRPCInferenceService method this route mirrors: the bearer token protects the same calls on both ports.
    # None: always open (the health probes, as grpc.health.v1 is).
    rpc: str | None


def model_routes(method: str, suffix: str, handler: Handler, rpc: str) -> tuple[Route, Route]:
    """`/v2/models/{model}<suffix>` and `/v2/models/{model}/versions/{version}<suffix>`: a version pins a variant."""
    return (
        Route(method, "/v2/models/{model}" + suffix, handler, rpc),
        Route(method, "/v2/models/{model}/versions/{version}" + suffix, handler, rpc),
    )


def model_of(request: web.Request) -> tuple[str, str]:
    """The model and version the path names; an empty version lets the router choose."""
    return request.match_info["model"], request.match_info.get("version", "")


def ok(value: Any) -> web.Response:
    return web.json_response(value)


def region_of(request: web.Request) -> str:
    """The region the path names; empty (every region) on the paths without `/region/{region}`."""
    return request.match_info.get("region", "")


def health(state: bool) -> web.Response:
    """The protocol's health answer: the status is the answer (200 true, 400 false), the body empty."""
    return web.Response(status=200 if state else 400)


class Routes:
    """Every REST endpoint over one DataPlane and one Control, as `table()` lists them."""

    def __init__(self, dataplane: DataPlane, control: Control) -> None:
        self.dataplane = dataplane
        self.control = control

    def table(self) -> list[Route]:
        return [
            Route("GET", "/v2/health/live", self.live, None),
            Route("GET", "/v2/health/ready", self.ready, None),
            Route("GET", "/v2", self.server_metadata, "ServerMetadata"),
            Route("GET", "/v2/models/stats", self.statistics, "ModelStatistics"),  # before /v2/models/{model}: "stats" is no model
            *model_routes("GET", "/ready", self.model_ready, "ModelReady"),
            *model_routes("GET", "", self.model_metadata, "ModelMetadata"),
            *model_routes("GET", "/config", self.model_config, "ModelConfig"),
            *model_routes("GET", "/stats", self.statistics, "ModelStatistics"),
            *model_routes("POST", "/infer", self.infer, "ModelInfer"),
            Route("POST", "/v2/repository/index", self.repository_index, "RepositoryIndex"),
            Route("POST", "/v2/repository/models/{model}/load", self.load, "RepositoryModelLoad"),
            Route("POST", "/v2/repository/models/{model}/unload", self.unload, "RepositoryModelUnload"),
            Route("GET", SHM + "/status", self.shm_status, "SystemSharedMemoryStatus"),
            Route("GET", SHM + "/region/{region}/status", self.shm_status, "SystemSharedMemoryStatus"),
            Route("POST", SHM + "/region/{region}/register", self.shm_register, "SystemSharedMemoryRegister"),
            Route("POST", SHM + "/unregister", self.shm_unregister, "SystemSharedMemoryUnregister"),
            Route("POST", SHM + "/region/{region}/unregister", self.shm_unregister, "SystemSharedMemoryUnregister"),
            Route("GET", "/v2/logging", self.log_settings, "LogSettings"),
            Route("POST", "/v2/logging", self.update_log_settings, "LogSettings"),
            Route("GET", "/v2/trace/setting", self.trace_settings, "TraceSetting"),
            Route("POST", "/v2/trace/setting", self.update_trace_settings, "TraceSetting"),
            Route("GET", "/v2/models/{model}/trace/setting", self.trace_settings, "TraceSetting"),
            Route("POST", "/v2/models/{model}/trace/setting", self.update_trace_settings, "TraceSetting"),
            # CUDA shared memory is not served: none registered to list or unregister; a registration is a precise 501.
            Route("GET", CUDA_SHM + "/status", self.cuda_shm_status, "CudaSharedMemoryStatus"),
            Route("GET", CUDA_SHM + "/region/{region}/status", self.cuda_shm_status, "CudaSharedMemoryStatus"),
            Route("POST", CUDA_SHM + "/region/{region}/register", self.cuda_shm_register, "CudaSharedMemoryRegister"),
            Route("POST", CUDA_SHM + "/unregister", self.cuda_shm_unregister, "CudaSharedMemoryUnregister"),
            Route("POST", CUDA_SHM + "/region/{region}/unregister", self.cuda_shm_unregister, "CudaSharedMemoryUnregister"),
        ]

    async def live(self, request: web.Request) -> web.Response:
        return health(True)

    async def ready(self, request: web.Request) -> web.Response:
        return health(self.dataplane.ready)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return ok({"name": self.control.server_name, "version": __version__, "extensions": EXTENSIONS})

    async def model_ready(self, request: web.Request) -> web.Response:
        return health(self.dataplane.is_ready(*model_of(request)))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return ok(codec.model_metadata(self.dataplane.metadata(*model_of(request))))

    async def infer(self, request: web.Request) -> web.Response:
        tracer = self.dataplane.tracer
        trace = tracer.begin(request.match_info["model"], request.headers.get("traceparent")) if tracer is not None else None
        arrived = perf_counter()  # the `timeout` parameter counts from here: reading and decoding the body are in it
        if trace is None:
            infer, form = codec.infer_request(*model_of(request), await request.read(), request.headers.get(codec.HEADER_LENGTH))
            infer.arrived = arrived
            body, headers = codec.infer_response(await self.dataplane.serve(infer), form)
            if infer.on_sent is not None:  # a request with a deadline: its variant learns when the answer was encoded
                infer.on_sent()
            return web.Response(body=body, headers=headers)
        code = "OK"
        try:
            infer, form = codec.infer_request(*model_of(request), await request.read(), request.headers.get(codec.HEADER_LENGTH))
            infer.arrived, infer.trace = arrived, trace
            body, headers = codec.infer_response(await self.dataplane.serve(infer), form)
            if infer.on_sent is not None:
                infer.on_sent()
            return web.Response(body=body, headers=headers)
        except BaseException as e:
            code = outcome_code(e)
            raise
        finally:
            tracer.finish(trace, code)

    async def repository_index(self, request: web.Request) -> web.Response:
        return ok(codec.repository_index(self.control.repository_index(codec.index_request(await request.read()))))

    async def load(self, request: web.Request) -> web.Response:
        config, files = codec.load_request(await request.read())
        await self.control.load_model(request.match_info["model"], config, files)
        return ok({})

    async def unload(self, request: web.Request) -> web.Response:
        codec.unload_request(await request.read())
        await self.control.unload_model(request.match_info["model"])
        return ok({})

    async def model_config(self, request: web.Request) -> web.Response:
        return ok(extensions.model_config(self.control.model_config(*model_of(request))))

    async def statistics(self, request: web.Request) -> web.Response:
        model, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return ok(extensions.statistics(self.control.statistics(model, version)))

    async def shm_status(self, request: web.Request) -> web.Response:
        return ok(extensions.shared_memory_status(self.control.shared_memory_status(region_of(request))))

    async def shm_register(self, request: web.Request) -> web.Response:
        key, offset, byte_size = extensions.register_request(await request.read())
        self.control.register_shared_memory(region_of(request), key, offset, byte_size)
        return ok({})

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self.control.unregister_shared_memory(region_of(request))
        return ok({})

    async def log_settings(self, request: web.Request) -> web.Response:
        return ok(self.control.log_settings())

    async def update_log_settings(self, request: web.Request) -> web.Response:
        return ok(self.control.update_log_settings(extensions.log_settings_request(await request.read())))

    async def cuda_shm_status(self, request: web.Request) -> web.Response:
        return ok(extensions.shared_memory_status(self.control.cuda_shared_memory_status(region_of(request))))

    async def cuda_shm_register(self, request: web.Request) -> web.Response:
        self.control.register_cuda_shared_memory(region_of(request))
        return ok({})

    async def cuda_shm_unregister(self, request: web.Request) -> web.Response:
        self.control.unregister_cuda_shared_memory(region_of(request))
        return ok({})

    async def trace_settings(self, request: web.Request) -> web.Response:
        return ok(self.control.trace_settings(request.match_info.get("model", "")))

    async def update_trace_settings(self, request: web.Request) -> web.Response:
        changes = codec.json_object(await request.read(), "trace settings request")
        return ok(self.control.update_trace_settings(changes, request.match_info.get("model", "")))
