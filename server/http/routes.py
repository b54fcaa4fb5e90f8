"""The REST endpoints of the Open Inference Protocol (KServe v2 / Triton): one table of routes, each decode -> one call -> encode.

A handler reads the path and body with server/http/codec.py, makes one DataPlane or Control call, and
encodes what it returns; errors are raised as domain errors and mapped in one place (server/http/server.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server import __version__
from server.control import Control
from server.dataplane import DataPlane
from server.http import codec

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What ServerMetadata lists over gRPC (server/servicers/inference.py), and the binary tensor extension only REST has.
EXTENSIONS = ["model_repository", "binary_tensor_data"]


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
            *model_routes("GET", "/ready", self.model_ready, "ModelReady"),
            *model_routes("GET", "", self.model_metadata, "ModelMetadata"),
            *model_routes("POST", "/infer", self.infer, "ModelInfer"),
            Route("POST", "/v2/repository/index", self.repository_index, "RepositoryIndex"),
            Route("POST", "/v2/repository/models/{model}/load", self.load, "RepositoryModelLoad"),
            Route("POST", "/v2/repository/models/{model}/unload", self.unload, "RepositoryModelUnload"),
        ]

    async def live(self, request: web.Request) -> web.Response:
        return health(True)

    async def ready(self, request: web.Request) -> web.Response:
        return health(self.dataplane.ready)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return ok({"name": "slimserve", "version": __version__, "extensions": EXTENSIONS})

    async def model_ready(self, request: web.Request) -> web.Response:
        return health(self.dataplane.is_ready(*model_of(request)))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return ok(codec.model_metadata(self.dataplane.metadata(*model_of(request))))

    async def infer(self, request: web.Request) -> web.Response:
        infer, form = codec.infer_request(*model_of(request), await request.read(), request.headers.get(codec.HEADER_LENGTH))
        body, headers = codec.infer_response(await self.dataplane.serve(infer), form)
        return web.Response(body=body, headers=headers)

    async def repository_index(self, request: web.Request) -> web.Response:
        return ok(codec.repository_index(self.control.repository_index(codec.index_request(await request.read()))))

    async def load(self, request: web.Request) -> web.Response:
        codec.load_request(await request.read())  # checked; Control.load_model takes no parameters yet
        await self.control.load_model(request.match_info["model"])
        return ok({})

    async def unload(self, request: web.Request) -> web.Response:
        codec.load_request(await request.read())
        await self.control.unload_model(request.match_info["model"])
        return ok({})
