"""Transport-neutral domain errors; the gRPC edge maps each kind to a status code in one place."""

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
