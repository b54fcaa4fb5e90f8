"""kill -9 mid-upload and mid-optimization: after a restart the repository is consistent and nothing is lost.

What was registered before still serves with the same answers; the staging area is empty; the
interrupted upload left no model; the job that was running is recorded failed ("interrupted") and
left no variant behind.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from client.client import SlimServeClient, SlimServeClientError
from tests.e2e.server_process import ServerProcess


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def staged_files(repo: Path) -> list[Path]:
    return [p for p in (repo / ".staging").rglob("*") if p.is_file()]


def assert_consistent(server: ServerProcess, repo: Path, digits, before: np.ndarray) -> None:
    with server.client() as c:
        assert [m["name"] for m in c.models()] == ["digits"]
        assert [v["name"] for v in c.model("digits")["variants"]] == ["baseline"]
        variant, outputs = c.infer("digits", {"x": digits.x_test[:8]})
    assert variant == "baseline"
    np.testing.assert_array_equal(outputs["logits"], before)
    assert list((repo / ".staging").iterdir()) == []
    assert sorted(p.name for p in (repo / "models").iterdir()) == ["digits"]
    assert sorted(p.name for p in (repo / "models" / "digits" / "variants").iterdir()) == ["baseline"]
    assert not list((repo / "models").rglob("*.tmp"))


@pytest.mark.slow
def test_kill_9_mid_upload_and_mid_job_leaves_the_repository_consistent(tmp_path, digits):
    repo = tmp_path / "repo"
    log = tmp_path / "server.log"
    server = ServerProcess(repo, log)
    try:
        with server.client() as c:
            c.register("digits", digits.onnx)
            _, outputs = c.infer("digits", {"x": digits.x_test[:8]})
            wait_for(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's evaluation")
        before = outputs["logits"]

        # 1. Mid-upload: a 24 MB model file streamed slowly; killed once part of it is on disk.
        big = tmp_path / "big.onnx"
        big.write_bytes(np.random.default_rng(0).bytes(24 << 20))
        upload_error: list[Exception] = []

        def upload() -> None:
            with server.client() as c:
                try:
                    c.register("big", big, progress=lambda sent, total: time.sleep(0.05))
                except SlimServeClientError as e:
                    upload_error.append(e)

        uploader = threading.Thread(target=upload)
        uploader.start()
        wait_for(lambda: any(p.stat().st_size >= 4 << 20 for p in staged_files(repo)), "part of the upload on disk")
        server.kill9()
        uploader.join(60)
        assert upload_error and upload_error[0].code == "UNAVAILABLE"
        assert staged_files(repo)  # the kill did leave a partial upload behind

        server = ServerProcess(repo, log)
        assert_consistent(server, repo, digits, before)

        # 2. Mid-job: an optimization job killed while its passes run in the staging area.
        job_error: list[Exception] = []

        def optimize() -> None:
            with server.client() as c:
                try:
                    c.optimize("digits", "quantize-dynamic", variant_name="int8")
                except SlimServeClientError as e:
                    job_error.append(e)

        worker = threading.Thread(target=optimize)
        worker.start()
        manifest = repo / "models" / "digits" / "manifest.json"

        def job_running() -> bool:
            jobs = json.loads(manifest.read_text()).get("jobs", {})
            return any(j["status"] == "running" for j in jobs.values()) and any((repo / ".staging").iterdir())

        wait_for(job_running, "the job to start its passes")
        time.sleep(0.3)
        assert job_running(), "the job finished before it could be killed"
        server.kill9()
        worker.join(60)
        assert job_error and job_error[0].code == "UNAVAILABLE"

        server = ServerProcess(repo, log)
        assert_consistent(server, repo, digits, before)
        with server.client() as c:
            [job] = c.jobs("digits")
            assert job["status"] == "failed" and "interrupted" in job["message"] and job["variant"] == "int8"
            c.register("again", digits.onnx)  # and the repository takes new work
            assert c.infer("again", {"x": digits.x_test[:1]})[0] == "baseline"
    finally:
        server.stop()


def test_a_variant_whose_evaluation_was_cut_short_is_measured_at_the_next_start(server_factory, tmp_path, digits):
    repo = tmp_path / "repo"
    first = server_factory(repo)
    with SlimServeClient(first.address) as c:
        c.register("digits", digits.onnx)
    first.stop()
    manifest = repo / "models" / "digits" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["variants"]["baseline"]["evaluation"] = {}  # as a kill during the background measurement leaves it
    manifest.write_text(json.dumps(data))
    second = server_factory(repo)
    with SlimServeClient(second.address) as c:
        wait_for(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's evaluation")
        assert c.model("digits")["variants"][0]["params"] == 85066
