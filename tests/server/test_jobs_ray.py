"""Jobs on a Ray cluster (`--job-runner ray://HOST:PORT`): a real local Ray head on loopback, started for the test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slimserve.client.client import SlimServeClient, SlimServeClientError
from tests.helpers import free_port, wait_until

pytest.importorskip("ray", reason="the Ray runner needs the slimserve[ray] extra")

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def head_at(temp: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`ray start --head --block` on loopback in its own process group, ended with the group: (address, process)."""
    import socket

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
        yield f"ray://127.0.0.1:{client_port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    with head_at(tmp_path_factory.mktemp("ray")) as (address, _):
        yield address


def job(c: SlimServeClient, job_id: str) -> dict:
    [record] = [j for j in c.jobs() if j["id"] == job_id]
    return record


def on_the_cluster(c: SlimServeClient, job_id: str) -> dict:
    """Waits until the job's Ray task reports progress of its own (past the server's 'queued', 'running' and 'ray')."""
    return wait_until(
        lambda: (j := job(c, job_id))["stage"] not in ("", "queued", "running", "ray") and j, "the Ray task's own progress", 180, 0.1
    )


def measured(c: SlimServeClient) -> None:
    """The baseline's measure (a task on the cluster too) is done: the job started next is the only task."""
    wait_until(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's measurement", 180, 0.2)


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


def test_cancelling_a_running_ray_job_ends_its_task_and_leaves_nothing(ray_head, server_factory, digits, tmp_path):
    server = server_factory(tmp_path / "repo", job_runner=ray_head, max_jobs=1)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx, data=digits.data, train=digits.train)
        measured(c)
        variant, _ = c.optimize("digits", "prune-structured", detach=True)
        job_id = variant["job_id"]
        on_the_cluster(c, job_id)
        start = time.monotonic()
        record = c.cancel_job(job_id)
        assert time.monotonic() - start < 5
        assert record["status"] == "cancelled" and "was cancelled" in record["message"], record
        assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
        assert not any(server.server.repository.staging_dir.iterdir())
        assert server.server.jobs.runner.refs == {}
        # The task's CPU (the head has one) is free again: the next job runs now, not after the cancelled one's minutes.
        start = time.monotonic()
        done, _ = c.optimize("digits", "graph-ort")
        assert done["status"] == "ready"
        assert time.monotonic() - start < 60


def test_a_cluster_that_dies_mid_job_fails_only_that_job(server_factory, digits, tmp_path):
    short = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    with contextlib.ExitStack() as cleanup, head_at(short) as (address, head):
        cleanup.callback(shutil.rmtree, short, ignore_errors=True)
        server = server_factory(tmp_path / "repo", job_runner=address, max_jobs=1)
        with SlimServeClient(server.address) as c:
            c.register("digits", digits.onnx, data=digits.data, train=digits.train)
            measured(c)
            variant, _ = c.optimize("digits", "prune-structured", detach=True)
            job_id = variant["job_id"]
            on_the_cluster(c, job_id)
            os.killpg(head.pid, signal.SIGKILL)  # the whole cluster: head, raylets, workers
            head.wait(30)
            record = wait_until(lambda: (j := job(c, job_id))["status"] not in ("queued", "running") and j, "the job to end", 180, 0.5)
            assert record["status"] == "failed", record
            assert f"the Ray cluster at {address}" in record["message"], record["message"]
            # Only that job: the server serves on, nothing of the job is registered or staged.
            assert c.infer("digits", {"x": digits.x_test[:4]})[0] == "baseline"
            assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
            assert not any(server.server.repository.staging_dir.iterdir())
            with pytest.raises(SlimServeClientError) as e:  # a job now cannot start on a cluster that is gone
                c.optimize("digits", "graph-ort")
            assert e.value.code in ("UNAVAILABLE", "FAILED_PRECONDITION") and address in e.value.message, e.value.message
