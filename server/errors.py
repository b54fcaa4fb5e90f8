"""Transport-neutral domain errors, and the HTTP status of each kind (the gRPC edge, server/grpc/edge.py, maps kinds to gRPC codes)."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid argument"
    NOT_FOUND = "not found"
    ALREADY_EXISTS = "already exists"
    FAILED_PRECONDITION = "failed precondition"
    RESOURCE_EXHAUSTED = "resource exhausted"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    DEADLINE_EXCEEDED = "deadline exceeded"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"


# The REST edge's status for each kind: the one Triton and KServe answer for the gRPC code of the same name.
# A kind without a row here fails tests/server/test_http_errors.py.
HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.ALREADY_EXISTS: 409,
    ErrorKind.FAILED_PRECONDITION: 400,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.UNIMPLEMENTED: 501,
    ErrorKind.INTERNAL: 500,
}


class SlimServeError(Exception):
    """An error a caller can act on: `kind` says which, `message` says what and how to fix it."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


class InvalidArgument(SlimServeError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(SlimServeError):
    kind = ErrorKind.NOT_FOUND


class AlreadyExists(SlimServeError):
    kind = ErrorKind.ALREADY_EXISTS


class FailedPrecondition(SlimServeError):
    kind = ErrorKind.FAILED_PRECONDITION


class ResourceExhausted(SlimServeError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(SlimServeError):
    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(SlimServeError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Unimplemented(SlimServeError):
    kind = ErrorKind.UNIMPLEMENTED
