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


def load_model_config(path: Path | None, labels: dict[str, Path] | None = None) -> dict[str, Any] | None:
    """A model config to register with a model: Triton's config.pbtxt (parsed with Triton's ModelConfig message) or its
    JSON form, with each `labels` output's label_filename set to its file's name; None when neither is given."""
    if path is None and not labels:
        return None
    config: dict[str, Any] = {}
    if path is not None:
        text = _read_file(path, "config file").decode("utf-8", errors="replace")
        if path.suffix.lower() == ".json":
            try:
                config = json.loads(text)
            except json.JSONDecodeError as e:
                raise SlimServeClientError("INVALID_ARGUMENT", f"config file '{path}' is not valid JSON: {e}") from None
            if not isinstance(config, dict):
                raise SlimServeClientError("INVALID_ARGUMENT", f"config file '{path}' must hold a JSON object of ModelConfig fields")
        else:
            from google.protobuf import json_format, text_format

            from slimserve.protos import model_config_pb2 as mpb

            message = mpb.ModelConfig()
            try:
                text_format.Parse(text, message)
            except text_format.ParseError as e:
                where = f"{path}:{e.GetLine()}:{e.GetColumn()}" if e.GetLine() is not None else str(path)
                raise SlimServeClientError(
                    "INVALID_ARGUMENT", f"{where}: {str(e).split(' : ', 1)[-1]} (Triton's ModelConfig text format)"
                ) from None
            config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    outputs = config.setdefault("output", [])
    for output, file in (labels or {}).items():
        if not Path(file).is_file():
            raise SlimServeClientError("INVALID_ARGUMENT", f"--labels {output}={file}: the file does not exist")
        entry = next((o for o in outputs if o.get("name") == output), None)
        if entry is None:
            entry = {"name": output}
            outputs.append(entry)
        entry["label_filename"] = Path(file).name
    if not outputs:
        del config["output"]
    return config


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
