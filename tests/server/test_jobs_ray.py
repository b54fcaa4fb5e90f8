"""Jobs on a Ray cluster (`--job-runner ray://HOST:PORT`): a real local Ray head on loopback, started for the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slimserve.client.client import SlimServeClient
from tests.helpers import free_port, wait_until

pytest.importorskip("ray", reason="the Ray runner needs the slimserve[ray] extra")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on loopback in its own process group, ended with the group."""
    import socket

    temp = tmp_path_factory.mktemp("ray")
    client_port = free_port()
    ray = Path(sys.executable).with_name("ray")
    command = [
        str(ray),
        "start",
        "--head",
        "--block",
        f"--port={free_port()}",
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
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_a_ray_job_makes_the_same_variant_as_the_local_runner(ray_head, server_factory, digits, tmp_path):
    results = {}
    for runner in ("local", ray_head):
        server = server_factory(tmp_path / runner.replace("/", "_").replace(":", "_"), job_runner=runner)
        with SlimServeClient(server.address) as c:
            c.register("digits", digits.onnx, data=digits.data)
            events = []
            variant, report = c.optimize("digits", "quantize-dynamic", on_progress=events.append)
            assert variant["status"] == "ready"
            if runner != "local":  # it ran there, and came back here to be registered and served
                assert any("Ray cluster at " + ray_head in e.message for e in events), [e.message for e in events]
                assert any(e.stage == "quantize-dynamic" for e in events), [e.stage for e in events]  # the task's own progress
                assert c.infer("digits", {"x": digits.x_test[:4]}, variant="quantize-dynamic")[0] == "quantize-dynamic"
            [job] = c.jobs("digits")
            assert job["status"] == "succeeded"
            results[runner] = (variant, report)
        server.stop()
    (local, local_report), (remote, remote_report) = results["local"], results[ray_head]
    for key in ("name", "recipe", "runtime", "params", "nonzero_params", "size_bytes", "accuracy"):
        assert local[key] == remote[key], key
    assert [r["variant"] for r in local_report] == [r["variant"] for r in remote_report]
