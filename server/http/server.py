"""The REST port: an aiohttp server on the gRPC server's event loop, with the same token, TLS and error mapping.

Errors are mapped in one middleware: a domain error's kind to its HTTP status (server/errors.HTTP_STATUS),
with a JSON body `{"error": "..."}` as Triton's clients read it.
"""

from __future__ import annotations

import errno
import logging
import ssl
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from slimserve.client.codec import TensorCodecError
from slimserve.server.errors import HTTP_STATUS, ErrorKind, SlimServeError
from slimserve.server.grpc.auth import INFERENCE_PREFIX, TokenAuthInterceptor
from slimserve.server.http.routes import Handler, Route
from slimserve.server.ports import in_use

log = logging.getLogger(__name__)

SERVICE = f"{INFERENCE_PREFIX}GRPCInferenceService/"


def status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message of an error, as server/edge.status_of gives the gRPC ones."""
    if isinstance(exc, SlimServeError):
        return HTTP_STATUS[exc.kind], exc.message
    if isinstance(exc, TensorCodecError):
        return HTTP_STATUS[ErrorKind.INVALID_ARGUMENT], str(exc)
    return HTTP_STATUS[ErrorKind.INTERNAL], f"internal error ({type(exc).__name__}); the server log has the details"


def error_response(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == HTTP_STATUS[ErrorKind.UNAUTHENTICATED] else None
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:  # aiohttp's own: no such path (404), method (405), a body past the limit (413)
        if e.status < 400:
            raise
        return error_response(e.status, f"{request.method} {request.path}: {e.text or e.reason}")
    except Exception as exc:
        status, message = status_of(exc)
        if status == HTTP_STATUS[ErrorKind.INTERNAL]:
            log.exception("%s %s failed", request.method, request.path, exc_info=exc)
        return error_response(status, message)


def guarded(handler: Handler, rpc: str | None, auth: TokenAuthInterceptor | None) -> Handler:
    """The handler behind the bearer token when gRPC protects the method it mirrors (server/grpc/auth.py decides)."""
    if auth is None or rpc is None or not auth.protects(SERVICE + rpc):
        return handler

    async def checked(request: web.Request) -> web.StreamResponse:
        refusal = auth.refusal(request.headers.get("Authorization", ""), carrier="header")
        if refusal is not None:
            raise SlimServeError(refusal, ErrorKind.UNAUTHENTICATED)
        return await handler(request)

    return checked


def tls_context(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext | None:
    """The gRPC port's TLS (server/auth.tls_server_credentials checked the files at start) as an SSLContext."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if ca is not None:  # mutual TLS: a client certificate this CA signed, or no handshake
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def build_app(routes: list[Route], auth: TokenAuthInterceptor | None, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=max_body_bytes)
    for route in routes:
        app.router.add_route(route.method, route.path, guarded(route.handler, route.rpc, auth))
    return app


class WrongProtocol(logging.Filter):
    """A connection that does not speak HTTP/1 (a gRPC client dialling the REST port): one warning line, no traceback."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__()
        self.port = port

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BadHttpMessage):
            peer = record.getMessage().rsplit(" from ", 1)[-1] if " from " in record.getMessage() else "a client"
            what = "HTTP/2 (a gRPC client?)" if "PRI" in str(error) else "something other than HTTP/1.1"
            record.msg, record.args, record.exc_info, record.exc_text = (
                "%s sent %s to the HTTP port %s; gRPC clients dial --grpc-port",
                (peer, what, self.port or ""),
                None,
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class HttpServer:
    """Serves an app on host:port (0 picks a free one) until `stop`."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        # handle_signals=False: the process's SIGTERM handler (server/app.py) stops both ports in order.
        self.runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            self.runner = None
            if e.errno == errno.EADDRINUSE:
                raise in_use("HTTP", host, port, "--http-port") from e
            raise in_use("HTTP", host, port, "--http-port", detail=e.strerror or str(e)) from e
        self.port = self.runner.addresses[0][1]
        server_log = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, WrongProtocol) for f in server_log.filters):
            server_log.addFilter(WrongProtocol(self.port))
        return self.port

    async def stop(self, grace: float) -> None:
        """Stops listening, closes idle connections, and gives requests in flight `grace` seconds."""
        if self.runner is not None:
            self.runner._shutdown_timeout = grace  # aiohttp takes the grace only in the runner's constructor, read at cleanup
            await self.runner.cleanup()
            self.runner = None
