"""The gRPC edge: one place that maps domain errors to status codes, for every servicer method."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from slimserve.client.codec import TensorCodecError
from slimserve.server.errors import ErrorKind, SlimServeError

log = logging.getLogger(__name__)

STATUS_OF_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, SlimServeError):
        return STATUS_OF_KIND[exc.kind], exc.message
    if isinstance(exc, TensorCodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details"


async def abort_with(exc: BaseException, context: grpc.aio.ServicerContext, where: str) -> None:
    """Ends the call with the status `exc` maps to (raises AbortError); a bug is logged with `where` it happened."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", where, exc_info=exc)
    await context.abort(code, message)


def checks_decoding(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a unary servicer method that refuses a MalformedRequest itself (`refuse_malformed` first, then its
    body in a try / except through `abort_with`): `checked_handler` then adds no layer around it. For the hot
    path (ModelInfer), where each coroutine layer costs a request about a microsecond."""
    method.checks_decoding = True
    return method


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a servicer method (unary or server-streaming) so that errors become statuses."""

    async def fail(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        await abort_with(exc, context, method.__qualname__)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit, StopAsyncIteration):
                raise
            except Exception as exc:
                await fail(exc, context)

        return stream_wrapper

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await fail(exc, context)

    return wrapper


# ------------------------------------------------------------------ request bytes that do not parse


class MalformedRequest:
    """What a request decoder returns in place of raising: grpc would answer UNKNOWN, we answer INVALID_ARGUMENT."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserialize, "__self__", None)  # the message class of `Message.FromString`
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the request message")

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, or anything a custom decoder raises
            return MalformedRequest(f"the request is not a valid {type_name}: {type(e).__name__}: {e}")

    return decode


async def refuse_malformed(context: grpc.aio.ServicerContext, request: MalformedRequest) -> None:
    """Ends a call whose request bytes did not parse with INVALID_ARGUMENT (raises AbortError)."""
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


async def _checked_stream(requests: Any) -> Any:
    async for request in requests:
        if type(request) is MalformedRequest:
            raise SlimServeError(request.message, ErrorKind.INVALID_ARGUMENT)
        yield request


def checked_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method, with a request decoder whose failures become INVALID_ARGUMENT."""
    if handler is None or handler.request_deserializer is None:
        return handler
    kwargs = {"request_deserializer": _safe_deserializer(handler.request_deserializer), "response_serializer": handler.response_serializer}
    if handler.request_streaming:
        # A bad message mid-stream raises in the servicer's loop, where @grpc_errors maps it.
        inner = handler.stream_stream if handler.response_streaming else handler.stream_unary
        if handler.response_streaming:

            async def stream_stream(requests, context):
                async for item in inner(_checked_stream(requests), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)

        async def stream_unary(requests, context):
            return await inner(_checked_stream(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    if handler.response_streaming:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            if type(request) is MalformedRequest:
                await refuse_malformed(context, request)
            async for item in inner_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    inner_unary = handler.unary_unary
    if getattr(inner_unary, "checks_decoding", False):
        return grpc.unary_unary_rpc_method_handler(inner_unary, **kwargs)

    async def unary_unary(request, context):
        if type(request) is MalformedRequest:
            await refuse_malformed(context, request)
        return await inner_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


class _CheckedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner
        self.cache: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        cached = self.cache.get(id(handler))
        if cached is None or cached[0] is not handler:
            cached = self.cache[id(handler)] = (handler, checked_handler(handler))
        return cached[1]


class _MethodTable(grpc.GenericRpcHandler):
    """Every method a servicer registered, by its full name (`/package.Service/Method`): one dict lookup a call."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(handler_call_details.method)


class CheckedDecoding:
    """Stands in for the server while servicers add themselves (`add_*_to_server(servicer, CheckedDecoding(server))`):
    every method they add answers INVALID_ARGUMENT to request bytes that do not parse, where grpc says UNKNOWN.

    Methods the generated code offers as "registered" are served through one generic handler instead: grpc aio
    keeps a pending request-call task per registered method and waits on all of them (`asyncio.wait`) for every
    call that arrives, so each request paid for the ~40 methods of our services (about a quarter of the server's
    CPU per request on the digits CNN: `python -m bench.bench_hotpath --grpc`). With one generic handler, as the
    floor server has, that wait covers one task."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server
        self.table = _MethodTable()
        server.add_generic_rpc_handlers((self.table,))  # first: asked before any other generic handler

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(tuple(_CheckedGenericHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for method, handler in handlers.items():
            self.table.handlers[f"/{service}/{method}"] = checked_handler(handler)
