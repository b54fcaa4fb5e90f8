"""The management use cases of server/management/control.py, called directly (no gRPC): what each changes in what is served."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from slimserve.server.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from slimserve.server.inference.dataplane import DataPlane, InferRequest
from slimserve.server.management.control import Control
from slimserve.server.management.jobs import JobManager
from slimserve.server.runtimes import RuntimeConfig
from slimserve.server.store.manifest import VariantInfo
from slimserve.server.store.repository import Repository
from slimserve.server.store.upload import Registrar, UploadFile, UploadHeader
from slimserve.server.telemetry.metrics import Metrics


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def control_of(root: Path, **plane_options):
    repository = Repository(root)
    metrics = Metrics()
    plane = DataPlane(repository, RuntimeConfig(), metrics, compute_threads=1, **plane_options)
    jobs = JobManager(repository, plane, RuntimeConfig())
    control = Control(repository, plane, Registrar(repository, RuntimeConfig(), 1 << 30), jobs, "cpu", 3.6)
    await plane.start()
    try:
        yield control
    finally:
        await jobs.stop()
        await plane.stop()
        repository.close()


async def register(control: Control, name: str, model: Path) -> None:
    data = model.read_bytes()  # noqa: ASYNC240  a small test file
    header = UploadHeader(name, (UploadFile("model", model.name, len(data), hashlib.sha256(data).hexdigest()),))

    async def chunks():
        yield 0, data

    await control.register(header, chunks())


async def add_copy(control: Control, model: str, variant: str, source: Path) -> None:
    """A ready variant stored and served, as a finished optimizer job leaves it."""
    with control.repository.staging() as staged:
        (staged / variant).mkdir()
        (staged / variant / "model.onnx").write_bytes(source.read_bytes())  # noqa: ASYNC240  a small test file
        info = VariantInfo(variant, recipe="test", parent="baseline", runtime="onnxruntime", format="onnx", file="model.onnx")
        control.repository.add_variant(model, staged / variant, info)
    await control.dataplane.refresh(model)


async def infer(control: Control, x: np.ndarray, version: str = "", request_id: str = "") -> str:
    result = await control.dataplane.serve(InferRequest("digits", version, request_id, lambda: {"x": x}))
    return result.variant


def sample(metrics: Metrics, name: str, variant: str, **extra) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "digits", "variant": variant, "node_type": "cpu", **extra})


def test_register_serves_at_once_and_refuses_a_second_model_of_that_name(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            await register(control, "digits", digits.onnx)
            assert await infer(control, digits.x_test[:1]) == "baseline"
            assert [m.name for m in control.list_models()] == ["digits"]
            with pytest.raises(AlreadyExists):
                await register(control, "digits", digits.onnx)

    run(scenario())


def test_a_deleted_variant_recreated_under_its_name_starts_from_zero(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            metrics = control.dataplane.loader.metrics
            await register(control, "digits", digits.onnx)
            await add_copy(control, "digits", "copy", digits.onnx)
            await infer(control, digits.x_test[:1], "copy", "r1")
            await control.feedback("digits", "r1", int(digits.y_test[0]))
            assert sample(metrics, "slimserve_feedback_total", "copy", correct="true") is not None
            await control.delete_variant("digits", "copy")
            assert sample(metrics, "slimserve_requests_total", "copy", code="OK") is None
            assert sample(metrics, "slimserve_feedback_total", "copy", correct="true") is None
            await add_copy(control, "digits", "copy", digits.onnx)
            rows = {r["variant"]: r for r in (await control.compare("digits")).rows}
            assert rows["copy"]["requests"] == 0 and rows["copy"]["feedback"] == 0
            with pytest.raises(NotFound):
                await control.feedback("digits", "r1", 0)  # the deleted variant's answer is not the new one's

    run(scenario())


def test_feedback_scores_the_answer_and_sets_online_accuracy(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            metrics = control.dataplane.loader.metrics
            await register(control, "digits", digits.onnx)
            await infer(control, digits.x_test[:1], request_id="a")
            await infer(control, digits.x_test[1:2], request_id="b")
            right = await control.feedback("digits", "a", int(digits.y_test[0]))
            wrong = await control.feedback("digits", "b", (int(digits.y_test[1]) + 1) % 10)
            assert (right.variant, right.correct, wrong.correct) == ("baseline", True, False)
            assert sample(metrics, "slimserve_online_accuracy_ratio", "baseline") == 0.5
            assert sample(metrics, "slimserve_feedback_total", "baseline", correct="false") == 1
            with pytest.raises(InvalidArgument, match="request_id is empty"):
                await control.feedback("digits", "", 1)
            await control.unload_model("digits")
            with pytest.raises(Unavailable, match="registered but not loaded"):
                await control.feedback("digits", "a", 1)

    run(scenario())


def test_traffic_changes_swap_the_router_and_survive_in_the_manifest(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            await register(control, "digits", digits.onnx)
            await add_copy(control, "digits", "copy", digits.onnx)
            policy = await control.set_traffic("digits", {"baseline": 0, "copy": 1}, [], None)
            assert policy.weights == {"baseline": 0.0, "copy": 1.0} and control.get_traffic("digits") == policy
            assert {await infer(control, digits.x_test[:1]) for _ in range(5)} == {"copy"}
            assert (await control.rollback("digits")).weights == {"baseline": 1.0}
            assert (await control.promote("digits", "copy")).weights == {"copy": 1.0}
            assert control.dataplane.models["digits"].router.policy.weights == {"copy": 1.0}

    run(scenario())


def test_compare_reads_each_served_variants_own_statistics(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            await register(control, "digits", digits.onnx)
            for i in range(3):
                await infer(control, digits.x_test[i : i + 1])
            comparison = await control.compare("digits")
            (row,) = comparison.rows
            assert (comparison.node_type, comparison.price_per_hour) == ("cpu", 3.6)
            assert row["requests"] == 3 and row["mean_batch"] == 1.0 and row["cost_per_1000"] > 0

    run(scenario())


def test_load_keeps_statistics_and_retires_the_old_runtimes_unload_drops_them(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            await register(control, "digits", digits.onnx)
            await infer(control, digits.x_test[:1])
            old = control.dataplane.models["digits"].variants["baseline"]
            await control.load_model("digits")  # RepositoryModelLoad of a loaded model: runtimes afresh
            new = control.dataplane.models["digits"].variants["baseline"]
            assert new.runtime is not old.runtime and new.stats is old.stats and new.stats.requests == 1
            await asyncio.sleep(0)  # the retiring task starts: the old batcher closes, drains, and its runtime unloads
            with pytest.raises(Unavailable):  # retired (it used to stay open, its runtime loaded, for ever)
                await old.batcher.submit({"x": digits.x_test[:1]})
            entries = control.repository_index()
            assert [(e.model, e.variant, e.ready) for e in entries] == [("digits", "baseline", True)]
            await control.unload_model("digits")
            assert [(e.ready, e.reason) for e in control.repository_index()] == [(False, "not loaded")]
            assert control.repository_index(ready_only=True) == []
            await control.unload_model("digits")  # not loaded: succeeds (Triton's rule), nothing changes
            assert [(e.ready, e.reason) for e in control.repository_index()] == [(False, "not loaded")]
            with pytest.raises(NotFound, match=r"not registered|no-such"):
                await control.unload_model("no-such")
            await control.load_model("digits")
            assert control.dataplane.models["digits"].variants["baseline"].stats.requests == 0

    run(scenario())


def test_delete_model_unloads_it_and_forgets_its_series(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            metrics = control.dataplane.loader.metrics
            await register(control, "digits", digits.onnx)
            await infer(control, digits.x_test[:1])
            await control.delete_model("digits")
            assert not control.dataplane.is_loaded("digits") and control.list_models() == []
            assert sample(metrics, "slimserve_requests_total", "baseline", code="OK") is None
            with pytest.raises(NotFound):
                await control.delete_model("digits")

    run(scenario())


def test_an_inference_does_not_wait_behind_a_slow_registration(tmp_path, digits, monkeypatch):
    """Registration's checks and commit and the model load run on the management pool: with one compute thread, and
    every predict call on it (no inline calls), an inference is answered while a registration is stuck in its commit."""

    async def scenario():
        async with control_of(tmp_path, inline_compute_s=0.0) as control:
            await register(control, "digits", digits.onnx)
            entered, release, threads = threading.Event(), threading.Event(), []
            commit, load_runtime = control.registrar.commit, control.dataplane.loader.load_runtime

            def slow_commit(*args):
                threads.append(threading.current_thread().name)
                entered.set()
                release.wait(60)
                return commit(*args)

            def recorded_load(*args):
                threads.append(threading.current_thread().name)
                return load_runtime(*args)

            monkeypatch.setattr(control.registrar, "commit", slow_commit)
            monkeypatch.setattr(control.dataplane.loader, "load_runtime", recorded_load)
            registering = asyncio.create_task(register(control, "second", digits.onnx))
            try:
                assert await asyncio.to_thread(entered.wait, 60), "the registration never reached its commit"
                assert await asyncio.wait_for(infer(control, digits.x_test[:1]), 20) == "baseline"
                assert not registering.done()  # the registration is still in its commit
            finally:
                release.set()
            await registering
            assert await infer(control, digits.x_test[:1]) == "baseline"
            assert len(threads) == 2 and all(t.startswith("management") for t in threads), threads

    run(scenario())


def test_list_passes_describes_the_catalog_and_names_an_unknown_pass(tmp_path):
    async def scenario():
        async with control_of(tmp_path) as control:
            passes = await control.list_passes()
            assert "quantize-static" in [p.name for p in passes]
            [one] = await control.list_passes("graph-ort")
            assert one.kind == "graph" and [s.name for s in one.settings] == ["version", "level", "providers"]
            with pytest.raises(NotFound, match="unknown pass 'shrink'"):
                await control.list_passes("shrink")

    run(scenario())
