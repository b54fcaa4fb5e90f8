"""Helpers every test folder shares: a free port, waiting until a condition holds (never a guessed sleep), a server process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

# One free port, one wait and one `slimserve start` command line for the tests and the benchmarks: bench.common's.
from bench.common import ROOT, free_port, slimserve_command, wait_until

__all__ = ["ROOT", "ServerProcess", "free_port", "slimserve_command", "wait_until"]


class ServerProcess:
    """`slimserve start` as a child process on a free port, for tests that signal it, kill it or watch its memory."""

    def __init__(self, repository: Path, log: Path, *flags: str, metrics_port: int = -1, http: bool = False) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        http_port = free_port() if http else -1  # REST off unless asked: servers side by side would all want 8000
        self.http_address = f"127.0.0.1:{http_port}"
        self.metrics_port = metrics_port
        self.log = log
        command = slimserve_command(repository, self.port, *flags, http_port=http_port, metrics_port=metrics_port)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def wait_ready(self, timeout: float = 120) -> None:
        from slimserve.client.client import SlimServeClientError

        def ready() -> bool:
            assert self.proc.poll() is None, f"slimserve exited {self.proc.returncode}: {self.log_tail()}"
            with self.client() as c:
                return c.server_ready()

        wait_until(ready, f"slimserve at {self.address} to be ready", timeout, interval=0.1, ignore=(SlimServeClientError,))

    def client(self):
        from slimserve.client.client import SlimServeClient

        return SlimServeClient(self.address, token="", tls_ca="", tls_cert="", tls_key="")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`, scraped from the server's /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and labels.items() <= s.labels.items()
        )

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def settled_rss(self) -> int:
        """The lowest of a few RSS samples a moment apart: RSS wobbles with requests in flight."""
        samples = []
        for _ in range(5):
            samples.append(self.rss_bytes())
            time.sleep(0.2)
        return min(samples)

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
