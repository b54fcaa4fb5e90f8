"""The client's plumbing below `SlimServeClient`: its error type, TLS credentials from PEM files, and the local
files a call sends (SHA-256 in chunks for uploads, recipe and plan files read as plain data).

SDK users import `SlimServeClientError` from `slimserve.client.client`, next to the client that raises it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import grpc

CHUNK_BYTES = 1 << 20


class SlimServeClientError(Exception):
    """A failed call: the gRPC status code name and the server's message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def load_recipe_file(path: Path) -> Any:
    """A recipe file (JSON or YAML) as plain data; the server validates its contents."""
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # JSONDecodeError, YAMLError
        raise SlimServeClientError("INVALID_ARGUMENT", f"recipe file '{path}' cannot be parsed: {e}") from None


def _read_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SlimServeClientError("INVALID_ARGUMENT", f"cannot read {what} '{path}': {e.strerror}") from None


def channel_credentials(ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel, or None for plaintext when nothing is given."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise SlimServeClientError("INVALID_ARGUMENT", "a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_file(ca, "--tls-ca") if ca else None,
        private_key=_read_file(key, "--tls-key") if key else None,
        certificate_chain=_read_file(cert, "--tls-cert") if cert else None,
    )


DEFAULT_PORT = 8001


def with_default_port(server: str) -> str:
    """HOST:PORT for grpc: a bare host (`127.0.0.1`, `localhost`, `[::1]`) gets slimserve's gRPC port, 8001, not gRPC's 443.

    Targets with a scheme (`dns:///...`, `unix:...`) and hosts that name a port are left as they are.
    """
    if not server or "/" in server or server.split(":", 1)[0] in ("unix", "unix-abstract", "dns", "ipv4", "ipv6", "vsock"):
        return server
    if server.startswith("["):  # [v6] or [v6]:port
        return server if "]:" in server else f"{server}:{DEFAULT_PORT}"
    colons = server.count(":")
    if colons == 0:
        return f"{server}:{DEFAULT_PORT}"
    if colons >= 2:  # a bare IPv6 address
        return f"[{server}]:{DEFAULT_PORT}"
    return server
