"""A busy port stops a second server at once with one line; the first keeps answering (issue 26)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from slimserve.server.ports import PortInUse
from tests.helpers import ROOT, ServerProcess, free_port, slimserve_command


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    server = ServerProcess(root / "repository", root / "server.log", metrics_port=free_port(), http=True)
    yield server
    server.stop()


def answers(server: ServerProcess, calls: int = 10) -> None:
    with server.client() as c:
        for _ in range(calls):
            assert c.server_ready()
            assert c.models() == []


@pytest.mark.parametrize("busy", ["grpc", "http", "metrics"])
def test_a_busy_port_is_one_line_and_a_quick_exit(first, busy, tmp_path):
    http_port = int(first.http_address.rsplit(":", 1)[1])
    ports = {
        "grpc": (first.port, free_port(), free_port()),
        "http": (free_port(), http_port, free_port()),
        "metrics": (free_port(), free_port(), first.metrics_port),
    }[busy]
    command = slimserve_command(tmp_path / "repository", ports[0], http_port=ports[1], metrics_port=ports[2])
    began = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    took = time.monotonic() - began
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    port = ports[("grpc", "http", "metrics").index(busy)]
    flag = f"--{busy}-port"
    assert len(lines) == 1, lines
    assert f":{port}" in lines[0] and flag in lines[0] and "in use" in lines[0], lines[0]
    # Interpreter start and typer's import are all it costs (2 s on a quiet machine; room for a loaded one here).
    assert took < 10, took
    answers(first)


def test_grpc_binds_exclusively_even_past_the_check(first, tmp_path, monkeypatch):
    """Without the early check, grpc's own bind refuses the port (no SO_REUSEPORT), and nothing stays half started."""
    from slimserve.server import app
    from slimserve.server.settings import Settings

    monkeypatch.setattr(app, "check_ports", lambda settings: None)
    server = app.SlimServer(Settings(repository=tmp_path / "repository", grpc_port=first.port, http_port=-1, metrics_port=-1))

    async def start() -> None:
        await server.start()
        await server.stop(0)  # it listened beside the first: stop it, and let pytest.raises fail the test

    with pytest.raises(PortInUse, match=f"{first.port}.*--grpc-port"):
        asyncio.run(start())
    answers(first)


def test_reuse_port_lets_a_second_process_share_the_grpc_port(first, tmp_path):
    """--reuse-port is the opt-in for several processes on one port: the check and the exclusive bind step aside."""
    from slimserve.server import app
    from slimserve.server.settings import Settings

    settings = Settings(repository=tmp_path / "repository", grpc_port=first.port, http_port=-1, metrics_port=-1, reuse_port=True)
    server = app.SlimServer(settings)

    async def start_and_stop() -> int | None:
        await server.start()
        port = server.port
        await server.stop(0)
        return port

    if sys.platform != "linux":
        pytest.skip("SO_REUSEPORT semantics are Linux's")
    # The first server did not ask for --reuse-port, so the kernel still refuses to share: exclusive on its side too.
    with pytest.raises(PortInUse):
        asyncio.run(start_and_stop())
    answers(first)


def test_unsent_bytes_counts_what_a_peer_has_not_acknowledged():
    """The drain on SIGTERM waits on it: bytes an accepted connection wrote that its peer's kernel has not taken yet.
    The peer does not read, so its window closes and the rest waits in our send queue; once it reads, nothing does."""
    import socket

    from slimserve.server.ports import unsent_bytes

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as peer:
            served, _ = listener.accept()
            with served:
                assert unsent_bytes([port]) == 0
                served.setblocking(False)
                sent = 0
                try:
                    while sent < 64 << 20:
                        sent += served.send(b"x" * 65536)
                except BlockingIOError:
                    pass  # the send buffer is full: the peer's window is closed
                waiting = unsent_bytes([port])
                assert waiting is not None and waiting > 0
                assert unsent_bytes([free_port()]) == 0  # another port's connections are not counted
                received = 0
                while received < sent:
                    received += len(peer.recv(1 << 20))
                deadline = time.monotonic() + 10
                while unsent_bytes([port]) and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert unsent_bytes([port]) == 0
