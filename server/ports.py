"""The ports a server listens on, checked before anything starts: a port in use is one line naming it and its flag.

gRPC's Python server sets SO_REUSEPORT by default, so a second server on a busy gRPC port would listen beside the first
and take half its calls; `server/app.py` turns it off (`grpc.so_reuseport` 0) unless `--reuse-port` asks for it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from slimserve.server.settings import Settings


class PortInUse(OSError):
    """A port that another process holds: the message names the port and the flag that changes it (no traceback)."""

    def __str__(self) -> str:  # the sentence alone, without OSError's "[Errno 98]"
        return self.strerror or super().__str__()


@dataclass(frozen=True)
class Port:
    what: str  # gRPC, HTTP, metrics
    setting: str  # the Settings field
    flag: str  # its `slimserve start` flag


PORTS = (
    Port("gRPC", "grpc_port", "--grpc-port"),
    Port("HTTP", "http_port", "--http-port"),
    Port("metrics", "metrics_port", "--metrics-port"),
)


def in_use(what: str, host: str, port: int, flag: str, detail: str = "") -> PortInUse:
    """The one-line refusal; `detail` replaces "in use" for another bind error (permission, an address not local)."""
    if detail:
        return PortInUse(errno.EADDRNOTAVAIL, f"cannot listen on {host}:{port} for {what}: {detail}; give another with {flag}")
    return PortInUse(
        errno.EADDRINUSE,
        f"cannot listen on {host}:{port} for {what}: the port is in use by another process (another slimserve?); "
        f"stop it, or give another port with {flag} (0 picks a free one)",
    )


def probe(host: str, port: int) -> OSError | None:
    """Binds host:port the way a listening server does (SO_REUSEADDR, no SO_REUSEPORT) and lets go; the error, if any."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        return e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            return e
    return None


def check_ports(settings: Settings) -> None:
    """Raises PortInUse for the first configured port (gRPC, HTTP, metrics) that another process listens on.

    Run before the models load, so that a second server on a busy port exits at once. A port of 0 (a free one) or -1
    (off) is not checked, nor the gRPC port with `--reuse-port` (several processes on one port by design).
    """
    for port in PORTS:
        number = getattr(settings, port.setting)
        if number <= 0 or (port.setting == "grpc_port" and settings.reuse_port):
            continue
        error = probe(settings.host, number)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            raise in_use(port.what, settings.host, number, port.flag)
        raise in_use(port.what, settings.host, number, port.flag, detail=error.strerror or str(error))


TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
ESTABLISHED, CLOSE_WAIT = "01", "08"


def unsent_bytes(ports: Iterable[int], tables: Iterable[str] = TCP_TABLES) -> int | None:
    """Bytes written to the open connections of these local ports that the peers have not acknowledged yet (the
    kernel's send queues, Linux's /proc/net/tcp); None where the tables cannot be read (another OS)."""
    wanted = {f"{p:04X}" for p in ports}
    total, read = 0, False
    for table in tables:
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        read = True
        for line in lines:
            fields = line.split()
            if len(fields) < 5 or fields[3] not in (ESTABLISHED, CLOSE_WAIT):
                continue
            if fields[1].rsplit(":", 1)[-1] in wanted:
                total += int(fields[4].split(":", 1)[0], 16)
    return total if read else None
