"""Triton's ModelStreamInfer pump: requests of one stream run concurrently, each answered on the stream when ready.

At most STREAM_IN_FLIGHT requests per stream are running or answered but not yet written; beyond
that the stream is not read and HTTP/2 flow control holds the client back (a client that sends
without reading the answers cannot grow the server's memory). A request that fails is answered
with its error and the stream goes on; a message that does not parse ends the stream with its status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from slimserve.protos import inference_pb2 as pb
from slimserve.server.grpc import converters
from slimserve.server.grpc.edge import status_of

log = logging.getLogger(__name__)

# Requests of one ModelStreamInfer stream that run at once; more wait unread in the stream.
STREAM_IN_FLIGHT = 256
_END = object()


async def pump(
    requests: AsyncIterator[pb.ModelInferRequest], infer: Callable[[pb.ModelInferRequest], Awaitable[pb.ModelInferResponse]]
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """The stream's answers, in the order they are ready; raises the error that ended the reading, if one did."""
    answers: asyncio.Queue = asyncio.Queue()
    running: set[asyncio.Task] = set()
    slots = asyncio.Semaphore(STREAM_IN_FLIGHT)

    async def answer(request: pb.ModelInferRequest) -> None:
        try:
            answers.put_nowait(converters.stream_answer(await infer(request)))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            code, message = status_of(e)
            if code == grpc.StatusCode.INTERNAL:
                log.error("ModelStreamInfer request failed", exc_info=e)
            answers.put_nowait(converters.stream_error(request, f"{code.name}: {message}"))

    async def read() -> None:
        try:
            async for request in requests:
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
