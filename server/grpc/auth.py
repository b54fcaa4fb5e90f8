"""Who may call: bearer-token authentication (a gRPC interceptor) and the TLS / mutual TLS credentials of the port."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

MANAGEMENT_PREFIX = "/slimserve.v1."
INFERENCE_PREFIX = "/inference."
# The Triton repository extension changes what is served: it is management, though it lives in `inference`.
REPOSITORY_METHODS = ("RepositoryModelLoad", "RepositoryModelUnload")


def read_token(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise OSError(f"cannot read --token-file {path}: {e.strerror}") from e
    if len(token) < 16:
        raise OSError(f"--token-file {path} holds {len(token)} characters; use a random token of at least 16")
    return token


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on protected methods; compares in constant time."""

    def __init__(self, token: str, protect_inference: bool = False) -> None:
        self.expected = f"Bearer {token}".encode()
        self.protect_inference = protect_inference

    def protects(self, method: str) -> bool:
        if method.startswith(MANAGEMENT_PREFIX):
            return True
        if method.startswith(INFERENCE_PREFIX):
            return self.protect_inference or method.rsplit("/", 1)[-1] in REPOSITORY_METHODS
        return False  # health and reflection stay open for probes and tools

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.protects(handler_call_details.method):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        refusal = self.refusal(metadata.get("authorization", ""))
        return handler if refusal is None else _deny(handler, refusal)

    def refusal(self, given: str | bytes, carrier: str = "metadata") -> str | None:
        """None when `given` is `Bearer <token>`, else why not; the REST port checks its `Authorization` header here too."""
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self.expected):
            return None
        reason = f"missing 'authorization: Bearer <token>' {carrier}" if not given else "the bearer token is wrong"
        return f"{reason}; pass --token or set SLIMSERVE_TOKEN"


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"cannot read {flag} {path}: {e.strerror}") from e
    if b"-----BEGIN " not in data:
        raise OSError(f"{flag} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def tls_server_credentials(cert: Path | None, key: Path | None, ca: Path | None) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key; with --tls-ca, clients must show a certificate that CA signed.
    None when no TLS is asked for (plaintext)."""
    if cert is None and key is None and ca is None:
        return None
    if cert is None or key is None:
        raise OSError("TLS needs both --tls-cert and --tls-key" + (" (--tls-ca alone only checks clients)" if ca is not None else ""))
    pair = (_read_pem(key, "--tls-key"), _read_pem(cert, "--tls-cert"))
    if ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_read_pem(ca, "--tls-ca"), require_client_auth=True)
