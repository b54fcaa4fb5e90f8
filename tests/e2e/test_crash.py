"""kill -9 mid-upload and mid-optimization: after a restart the repository is consistent and nothing is lost.

What was registered before still serves with the same answers; the staging area is empty; the
interrupted upload left no model; the job that was running is recorded failed ("interrupted") and
left no variant behind.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from slimserve.client.client import SlimServeClient, SlimServeClientError
from tests.helpers import ServerProcess, wait_until

UPLOAD_PAUSE_BYTES = 8 << 20  # the uploader stops here until the server is killed: the upload cannot finish first


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
            wait_until(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's evaluation", 120)
        before = outputs["logits"]

        # 1. Mid-upload: a 24 MB model file whose upload pauses after 8 MB; killed once 4 MB of it are on disk.
        big = tmp_path / "big.onnx"
        big.write_bytes(np.random.default_rng(0).bytes(24 << 20))
        upload_error: list[Exception] = []
        killed = threading.Event()

        def pause_until_killed(sent: int, total: int) -> None:
            if sent >= UPLOAD_PAUSE_BYTES:
                killed.wait(120)

        def upload() -> None:
            with server.client() as c:
                try:
                    c.register("big", big, progress=pause_until_killed)
                except SlimServeClientError as e:
                    upload_error.append(e)

        uploader = threading.Thread(target=upload)
        uploader.start()
        wait_until(lambda: any(p.stat().st_size >= 4 << 20 for p in staged_files(repo)), "part of the upload on disk", 120)
        server.kill9()
        killed.set()
        uploader.join(60)
        assert upload_error and upload_error[0].code == "UNAVAILABLE"
        assert staged_files(repo)  # the kill did leave a partial upload behind

        server = ServerProcess(repo, log)
        assert_consistent(server, repo, digits, before)

        # 2. Mid-job: an optimization job killed the moment it reports its passes done (their output in the
        # staging area, the variant not yet measured nor moved in), from the job's own progress stream.
        job_error: list[Exception] = []
        manifest = repo / "models" / "digits" / "manifest.json"
        at_kill: dict[str, object] = {}
        victim = server

        def kill_when_passes_are_done(event) -> None:
            if event.stage == "passes" and not at_kill:
                at_kill["jobs"] = json.loads(manifest.read_text()).get("jobs", {})
                victim.kill9()
                at_kill["staged"] = staged_files(repo)

        with server.client() as c:
            try:
                c.optimize("digits", "quantize-dynamic", variant_name="int8", on_progress=kill_when_passes_are_done)
            except SlimServeClientError as e:
                job_error.append(e)
        assert at_kill, "the job never reported its passes done"
        assert [j["status"] for j in at_kill["jobs"].values()] == ["running"]
        assert at_kill["staged"], "the kill left the job's work in the staging area"
        assert job_error and job_error[0].code == "UNAVAILABLE"

        server = ServerProcess(repo, log)
        assert_consistent(server, repo, digits, before)
        with server.client() as c:
            [job] = c.jobs("digits")
            assert job["status"] == "interrupted" and "interrupted" in job["message"] and job["variant"] == "int8"
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
        wait_until(lambda: c.model("digits")["variants"][0]["latency_p50_ms"] is not None, "the baseline's evaluation", 120)
        assert c.model("digits")["variants"][0]["params"] == 85066
