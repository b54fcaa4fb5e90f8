"""Jobs on a Ray cluster (`--job-runner ray://HOST:PORT` through Ray Client, `ray+gcs://HOST:PORT` through the GCS): a
real local Ray head on loopback, started for the test (in a short /tmp directory: Ray's socket paths must stay under
107 bytes). The server never imports Ray: each job's Ray driver is a process of its own (management/ray_driver.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from bench.ray_head import head_at, short_dir
from slimserve.client.client import SlimServeClient, SlimServeClientError
from tests.helpers import wait_until

pytest.importorskip("ray", reason="the Ray runner needs the slimserve[ray] extra")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    """(client address, GCS address) of a head the module's tests share."""
    with short_dir() as temp, head_at(temp) as (client, gcs, _):
        yield client, gcs


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


def test_a_ray_job_makes_the_same_variant_with_the_same_measured_quality_as_the_local_runner(ray_head, server_factory, digits, tmp_path):
    """Through Ray Client and through the GCS: the variant's record, files and measured quality are the local runner's."""
    results = {}
    for runner in ("local", *ray_head):
        server = server_factory(tmp_path / runner.replace("/", "_").replace(":", "_").replace("+", "_"), job_runner=runner)
        with SlimServeClient(server.address) as c:
            c.register("digits", digits.onnx, data=digits.data)
            events = []
            variant, report = c.optimize("digits", "quantize-dynamic", on_progress=events.append)
            assert variant["status"] == "ready"
            if runner != "local":  # it ran there, and came back here to be registered and served
                assert any("Ray cluster at " + runner in e.message for e in events), [e.message for e in events]
                assert any(e.stage == "quantize-dynamic" for e in events), [e.stage for e in events]  # the task's own progress
                assert c.infer("digits", {"x": digits.x_test[:4]}, variant="quantize-dynamic")[0] == "quantize-dynamic"
            [job] = c.jobs("digits")
            assert job["status"] == "succeeded"
            stored = server.server.repository.variant_dir("digits", "quantize-dynamic")
            files = {p.name: p.read_bytes() for p in sorted(stored.iterdir()) if p.suffix == ".onnx"}
            results[runner] = (variant, report, files)
        server.stop()
    local, local_report, local_files = results.pop("local")
    assert local_files and local["accuracy"] is not None
    for runner, (remote, remote_report, remote_files) in results.items():
        for key in ("name", "recipe", "runtime", "params", "nonzero_params", "size_bytes", "accuracy"):
            assert local[key] == remote[key], (runner, key, local[key], remote[key])
        assert remote_files == local_files, runner  # the same bytes: the same variant
        # The same measured quality, row by row of the report (what changes from run to run is only the timing).
        quality = ("variant", "params", "nonzero_params", "size_bytes", "accuracy_pct", "accuracy_delta_pt", "agreement", "quality")
        assert [{k: r.get(k) for k in quality} for r in local_report] == [{k: r.get(k) for k in quality} for r in remote_report], runner


def test_cancelling_a_running_ray_job_ends_its_task_and_leaves_nothing(ray_head, server_factory, digits, tmp_path):
    server = server_factory(tmp_path / "repo", job_runner=ray_head[0], max_jobs=1)
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
        assert server.server.jobs.runner.pids == {}  # its driver process has ended
        # The task's CPU (the head has one) is free again: the next job runs now, not after the cancelled one's minutes.
        start = time.monotonic()
        done, _ = c.optimize("digits", "graph-ort")
        assert done["status"] == "ready"
        assert time.monotonic() - start < 60


@pytest.mark.parametrize("through", ["client", "gcs"])
def test_a_cluster_that_dies_mid_job_fails_only_that_job(through, server_factory, digits, tmp_path):
    with short_dir() as temp, head_at(temp) as (client, gcs, head):
        address = client if through == "client" else gcs
        server = server_factory(tmp_path / "repo", job_runner=address, max_jobs=1)
        with SlimServeClient(server.address) as c:
            c.register("digits", digits.onnx, data=digits.data, train=digits.train)
            measured(c)
            variant, _ = c.optimize("digits", "prune-structured", detach=True)
            job_id = variant["job_id"]
            on_the_cluster(c, job_id)
            os.killpg(head.pid, signal.SIGKILL)  # the whole cluster: head, raylets, workers
            killed = time.monotonic()
            head.wait(30)
            record = wait_until(lambda: (j := job(c, job_id))["status"] not in ("queued", "running") and j, "the job to end", 180, 0.5)
            assert record["status"] == "failed", record
            assert f"the Ray cluster at {address}" in record["message"], record["message"]
            # In seconds: the driver watches the cluster's port (Ray alone waits 30 s to a minute before it gives up).
            assert time.monotonic() - killed < 20, (time.monotonic() - killed, record["message"])
            # Only that job: the server serves on, nothing of the job is registered or staged.
            assert c.infer("digits", {"x": digits.x_test[:4]})[0] == "baseline"
            assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
            assert not any(server.server.repository.staging_dir.iterdir())
            with pytest.raises(SlimServeClientError) as e:  # a job now cannot start on a cluster that is gone
                c.optimize("digits", "graph-ort")
            assert e.value.code in ("UNAVAILABLE", "FAILED_PRECONDITION") and address in e.value.message, e.value.message
