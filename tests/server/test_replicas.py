"""One writer per repository; read-only replicas serve it and pick up the writer's changes live."""

from __future__ import annotations

import pytest

from slimserve.client.client import SlimServeClient, SlimServeClientError
from slimserve.server.errors import FailedPrecondition
from slimserve.server.store.repository import Repository
from tests.helpers import wait_until


def test_a_second_writer_is_refused_with_the_way_out(tmp_path):
    first = Repository(tmp_path / "repo")
    with pytest.raises(FailedPrecondition, match=r"in use by another slimserve.*--read-only"):
        Repository(tmp_path / "repo")
    first.close()
    Repository(tmp_path / "repo").close()  # released on close


def test_a_read_only_replica_serves_what_the_writer_changes_and_refuses_writes(server_factory, tmp_path, digits):
    repository = tmp_path / "shared"
    replica = server_factory(repository, read_only=True, poll_repository_s=0.2)  # started before the writer: serves nothing yet
    writer = server_factory(repository)
    x = {"x": digits.x_test[:4]}
    with SlimServeClient(writer.address) as w, SlimServeClient(replica.address) as r:
        w.register("digits", digits.onnx, data=digits.data)
        wait_until(lambda: r.model_ready("digits"), "the replica to load digits", timeout=20)
        _, out = r.infer("digits", x)
        _, expected = w.infer("digits", x)
        assert (out["logits"] == expected["logits"]).all()

        # routing changed on the writer reaches the replica
        w.optimize("digits", "graph-ort")
        w.promote("digits", "graph-ort")
        wait_until(lambda: r.infer("digits", x)[0] == "graph-ort", "the replica to route to graph-ort", timeout=20)

        # writes on the replica are refused, naming the writer
        for call in (lambda: r.register("other", digits.onnx), lambda: r.traffic("digits", {"baseline": 1}), lambda: r.delete("digits")):
            with pytest.raises(SlimServeClientError, match="read-only replica") as e:
                call()
            assert e.value.code == "FAILED_PRECONDITION"
        assert r.model_ready("digits")  # the refused delete unloaded nothing

        # a model deleted by the writer is unloaded on the replica
        w.delete("digits")
        wait_until(lambda: not r.model_ready("digits"), "the replica to drop digits", timeout=20)


def test_recovery_sweeps_a_crashed_kept_thread_count_write(tmp_path):
    from slimserve.server.store.manifest import ModelInfo, VariantInfo

    repo = Repository(tmp_path / "repo")
    with repo.staging() as staged:
        (staged / "variants" / "baseline").mkdir(parents=True)
        baseline = VariantInfo("baseline", "", "", "onnxruntime", "onnx", file="model.onnx")
        repo.add_model(staged, ModelInfo("m", "onnx", "", "", [], [], [], {"baseline": baseline}))
    variant_dir = repo.model_dir("m") / "variants" / "baseline"
    crashed = variant_dir / ".model.onnx.threads.json.0123.tmp"  # ort_threads.keep's temporary file, never renamed
    crashed.write_text("{")
    kept = variant_dir / "model.onnx.threads.json"
    kept.write_text("{}")
    repo.close()
    Repository(tmp_path / "repo").close()  # a restart recovers
    assert not crashed.exists() and kept.exists()
