"""A real Ray head on loopback for the Ray tests and `bench.bench_ray_connect`: `ray start --head --block` in its own
process group on 127.0.0.1 and free ports, in a short /tmp directory (Ray's socket paths must stay under 107 bytes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.common import free_port, wait_until


@contextlib.contextmanager
def head_at(temp: Path) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """`ray start --head --block` on loopback in its own process group, ended with the group:
    (client address `ray://...`, GCS address `ray+gcs://...`, process)."""
    import socket

    client_port, gcs_port = free_port(), free_port()
    ray = Path(sys.executable).with_name("ray")
    command = [
        str(ray),
        "start",
        "--head",
        "--block",
        f"--port={gcs_port}",
        f"--ray-client-server-port={client_port}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=false",
        "--num-cpus=1",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    log = open(temp / "head.log", "wb")  # noqa: SIM115  closed at teardown
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def listening() -> bool:
        assert proc.poll() is None, (temp / "head.log").read_text()[-2000:]
        try:
            with socket.create_connection(("127.0.0.1", client_port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_until(listening, "the Ray head's client port", 120, 0.5)
        yield f"ray://127.0.0.1:{client_port}", f"ray+gcs://127.0.0.1:{gcs_port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
