"""Optimizer jobs in worker processes: queued under --max-jobs, cancelled within seconds, a dying worker fails only its job."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from slimserve.client.client import SlimServeClient, SlimServeClientError
from tests.helpers import wait_until


def start_job(c: SlimServeClient, recipe: str, name: str = "") -> str:
    variant, report = c.optimize("digits", recipe, variant_name=name, detach=True)
    assert report == []
    return variant["job_id"]


def job(c: SlimServeClient, job_id: str) -> dict:
    [record] = [j for j in c.jobs() if j["id"] == job_id]
    return record


def worker_pid(server, job_id: str) -> int:
    return wait_until(lambda: server.server.jobs.runner.pids.get(job_id), f"job {job_id}'s worker", 30, 0.05)


def working(c: SlimServeClient, job_id: str) -> dict:
    """Waits until the job's worker reports work of its own (past 'queued' and 'running')."""
    return wait_until(
        lambda: (j := job(c, job_id))["stage"] not in ("", "queued", "running") and j, "the worker's first progress", 120, 0.1
    )


def staging_is_empty(server) -> bool:
    return not any(server.server.repository.staging_dir.iterdir())


def measured(c: SlimServeClient) -> None:
    """Waits for the baseline's background measurement (a worker of its own, in a slot of `--max-jobs`), so that the
    job a test starts next is the only worker."""
    wait_until(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's measurement", 120, 0.2)


@pytest.fixture
def registered(server_factory, digits):
    server = server_factory(max_jobs=1, job_nice=19)  # the server's default priority, which a test checks
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx, data=digits.data, train=digits.train)
        measured(c)
        yield server, c


def test_queue_then_cancel_within_seconds_leaves_nothing(registered):
    server, c = registered
    running = start_job(c, "prune-structured")
    queued = start_job(c, "graph-ort")
    pid = worker_pid(server, running)
    assert job(c, queued)["status"] == "queued"  # --max-jobs 1: the second waits its turn
    cancelled = c.cancel_job(queued)
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] == ""  # it never ran
    record = working(c, running)
    assert record["status"] == "running" and 0.0 <= record["progress"] <= 1.0

    start = time.monotonic()
    record = c.cancel_job(running)
    assert time.monotonic() - start < 5
    assert record["status"] == "cancelled" and "was cancelled" in record["message"] and record["finished_at"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone
    assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
    assert staging_is_empty(server)
    assert not (server.server.repository.model_dir("digits") / "variants" / "prune-structured").exists()

    # Bad input: a job that has ended, and one that never existed.
    with pytest.raises(SlimServeClientError) as e:
        c.cancel_job(running)
    assert e.value.code == "FAILED_PRECONDITION" and "has already ended: cancelled" in e.value.message
    with pytest.raises(SlimServeClientError) as e:
        c.cancel_job("nosuchjob")
    assert e.value.code == "NOT_FOUND" and "no job 'nosuchjob'" in e.value.message and "slimctl jobs" in e.value.message


def test_a_killed_worker_fails_only_its_job(registered, digits):
    server, c = registered
    doomed = start_job(c, "prune-structured")
    pid = worker_pid(server, doomed)
    working(c, doomed)
    # Below the server's priority, with its threads capped (2 cores, 2 compute threads: 1 thread for the job).
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 19)
    # Every thread of it in SCHED_IDLE (--job-nice 19): a serving thread that wakes takes its core at once.
    if hasattr(os, "SCHED_IDLE"):
        tasks = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        assert tasks and {os.sched_getscheduler(t) for t in tasks} == {os.SCHED_IDLE}
    # In the server's session, so in its autogroup (Linux's per-session CPU groups), where that nice weighs against the
    # server's threads; a process group of its own, which a cancel ends whole.
    assert os.getsid(pid) == os.getsid(0) and os.getpgid(pid) == pid
    # The file reads empty for a task in a cgroup of its own (containers: CI's), where autogroups do not apply.
    ours = Path("/proc/self/autogroup").read_text() if Path("/proc/self/autogroup").exists() else ""
    if ours.strip():
        assert Path(f"/proc/{pid}/autogroup").read_text().split()[:1] == ours.split()[:1]
    environ = dict(line.split("=", 1) for line in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in line)
    assert environ["OMP_NUM_THREADS"] == str(server.settings.job_threads())
    os.kill(pid, signal.SIGKILL)
    record = wait_until(lambda: (j := job(c, doomed))["status"] == "failed" and j, "the job to fail", 30, 0.05)
    assert "the worker was killed (SIGKILL" in record["message"]
    assert staging_is_empty(server)
    # The server never noticed: it serves, and the next job runs and registers its variant.
    assert c.infer("digits", {"x": digits.x_test[:4]})[0] == "baseline"
    variant, _ = c.optimize("digits", "graph-ort")
    assert variant["status"] == "ready"
    assert {j["id"]: j["status"] for j in c.jobs("digits")}[doomed] == "failed"


def test_a_memory_cap_too_low_fails_the_job_naming_it(server_factory, digits):
    server = server_factory(job_memory_mb=64)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx, data=digits.data)  # its measure, a worker too, fails over the cap (logged)
        with pytest.raises(SlimServeClientError) as e:
            c.optimize("digits", "graph-ort")
        assert e.value.code == "RESOURCE_EXHAUSTED", e.value
        assert "over the job memory cap of 64 MiB (--job-memory-mb)" in e.value.message
        assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
        [record] = c.jobs("digits")
        assert record["status"] == "failed" and "64 MiB" in record["message"]
    assert staging_is_empty(server)


def test_an_unreachable_ray_cluster_refuses_the_start(tmp_path):
    import asyncio

    from slimserve.server.app import SlimServer
    from slimserve.server.errors import Unavailable
    from slimserve.server.settings import Settings
    from tests.helpers import free_port

    port = free_port()
    settings = Settings(
        repository=tmp_path / "repo", grpc_port=free_port(), http_port=-1, metrics_port=-1, job_runner=f"ray://127.0.0.1:{port}"
    )
    server = SlimServer(settings)
    with pytest.raises(Unavailable) as e:
        asyncio.run(server.start())
    assert f"cannot reach the Ray cluster at ray://127.0.0.1:{port}" in e.value.message and "--job-runner" in e.value.message


def test_job_runner_must_be_local_or_a_ray_address():
    from pydantic import ValidationError

    from slimserve.server.settings import Settings

    with pytest.raises(ValidationError):
        Settings(job_runner="ray://nohostport")
    with pytest.raises(ValidationError):
        Settings(job_runner="http://10.0.0.1:8265")
    assert Settings(job_runner="ray://10.0.0.1:10001").job_runner == "ray://10.0.0.1:10001"
    assert Settings(job_runner="ray+gcs://10.0.0.1:6379").job_runner == "ray+gcs://10.0.0.1:6379"
