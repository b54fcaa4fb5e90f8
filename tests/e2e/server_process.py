"""`slimserve start` as a child process on a free port, for tests that kill it or watch its memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from client.client import SlimServeClient, SlimServeClientError
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, repository: Path, log: Path, *flags: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "server.cli", "start", "--repository", str(repository), "--grpc-port", str(self.port),
                   "--metrics-port", "-1", "--log-level", "WARNING", *flags]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"slimserve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            try:
                with SlimServeClient(self.address, token="", tls_ca="", tls_cert="", tls_key="") as c:
                    if c.server_ready():
                        return
            except SlimServeClientError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"slimserve at {self.address} did not become ready: {self.log.read_text()[-2000:]}")

    def client(self) -> SlimServeClient:
        return SlimServeClient(self.address, token="", tls_ca="", tls_cert="", tls_key="")

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()
