"""Variants that no route serves kept out of memory (server/inference/loader.py, `--unload-idle-variants-s`): not loaded at start,
unloaded when idle, loaded again by the request that pins one, and reported as they are."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from slimserve.server.errors import Unavailable
from slimserve.server.inference.dataplane import DataPlane, InferRequest
from slimserve.server.management.control import Control
from slimserve.server.management.jobs import JobManager
from slimserve.server.runtimes import RuntimeConfig
from slimserve.server.store.repository import Repository
from slimserve.server.store.upload import Registrar
from slimserve.server.telemetry.metrics import Metrics
from tests.server.test_control import add_copy, register, run


@asynccontextmanager
async def lazy_control(root: Path, unload_idle_s: float = 3600.0):
    repository = Repository(root)
    plane = DataPlane(repository, RuntimeConfig(), Metrics(), compute_threads=1, unload_idle_s=unload_idle_s)
    jobs = JobManager(repository, plane, RuntimeConfig())
    control = Control(repository, plane, Registrar(repository, RuntimeConfig(), 1 << 30), jobs, "cpu", 3.6)
    await plane.start()
    try:
        yield control
    finally:
        await jobs.stop()
        await plane.stop()
        repository.close()


async def with_copies(control: Control, digits, names: list[str]) -> None:
    await register(control, "digits", digits.onnx)
    for name in names:
        await add_copy(control, "digits", name, digits.onnx)


async def logits(control: Control, x: np.ndarray, version: str = "") -> tuple[str, np.ndarray]:
    result = await control.dataplane.serve(InferRequest("digits", version, "", lambda: {"x": x}))
    return result.variant, result.outputs["logits"]


def counting_loads(plane: DataPlane) -> list[str]:
    """Records every variant the loader loads a runtime for (on the compute pool)."""
    loads: list[str] = []
    original = plane.loader.load_runtime

    def load_runtime(info, variant):
        loads.append(variant)
        time.sleep(0.05)  # a load that takes a while: concurrent requests pile up behind it
        return original(info, variant)

    plane.loader.load_runtime = load_runtime
    return loads


def test_unrouted_variants_stay_unloaded_until_a_pinned_request_loads_one_and_it_answers(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path) as control:
            plane = control.dataplane
            await with_copies(control, digits, ["v1", "v2", "v3"])
            loaded = plane.models["digits"]
            assert set(loaded.variants) == {"baseline"} and set(loaded.unloaded) == {"v1", "v2", "v3"}
            assert not plane.is_ready("digits", "v2") and plane.is_ready("digits")
            index = {e.variant: e for e in control.repository_index()}
            assert not index["v2"].ready and "no route serves it" in index["v2"].reason and index["baseline"].ready
            # ModelConfig and ModelMetadata answer for it from what it will serve.
            assert [s.name for s in control.model_config("digits", "v2").inputs] == ["x"]
            # The runtime's own settings only where one is loaded: ORT's measured thread count, keyed as Triton's backend.
            threads = loaded.variants["baseline"].runtime.intra_op_threads
            assert control.model_config("digits", "baseline").parameters == {"intra_op_thread_count": str(threads)}
            assert control.model_config("digits", "v2").parameters == {}
            assert "v2" in plane.metadata("digits", "").versions

            _, expected = await logits(control, digits.x_test[:3])
            variant, got = await logits(control, digits.x_test[:3], "3")  # by integer version: v2
            assert variant == "v2" and np.allclose(got, expected, atol=1e-5)
            assert plane.loader.reloads == 1 and plane.is_ready("digits", "v2")
            assert set(plane.models["digits"].unloaded) == {"v1", "v3"}
            assert next(e for e in control.repository_index() if e.variant == "v2").ready
            assert control.statistics("digits", "v2")[0].stats.requests == 1

    run(scenario())


def test_an_idle_unrouted_variant_is_unloaded_its_runtime_released_and_its_statistics_kept(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path, unload_idle_s=60) as control:
            plane, loader = control.dataplane, control.dataplane.loader
            await with_copies(control, digits, ["v1"])
            await logits(control, digits.x_test[:1], "v1")
            served = plane.models["digits"].variants["v1"]
            now = time.monotonic()
            assert loader.unload_idle(now) == []  # first look: idle from now on
            assert loader.unload_idle(now + 59) == []
            await logits(control, digits.x_test[:1], "v1")  # a request restarts the clock
            assert loader.unload_idle(now + 61) == []
            assert loader.unload_idle(now + 122) == [("digits", "v1")]
            assert "v1" in plane.models["digits"].unloaded and "v1" not in plane.models["digits"].variants
            await wait_until_async(lambda: served.runtime.session is None, "the unloaded runtime released its session")
            assert "without requests" in plane.models["digits"].unloaded["v1"].reason
            assert control.statistics("digits", "v1")[0].stats.requests == 2
            await logits(control, digits.x_test[:1], "v1")  # back on demand, statistics go on
            assert plane.models["digits"].variants["v1"].stats.requests == 3 and loader.reloads == 2

    run(scenario())


def test_the_reaper_unloads_an_idle_variant_by_itself(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path, unload_idle_s=0.1) as control:
            plane = control.dataplane
            await with_copies(control, digits, ["v1"])
            await logits(control, digits.x_test[:1], "v1")
            assert "v1" in plane.models["digits"].variants
            await wait_until_async(lambda: "v1" in plane.models["digits"].unloaded, "v1 unloaded after 0.1 s idle")
            assert plane.loader.idle_unloads == 1

    run(scenario())


def test_routed_shadow_and_rollout_variants_are_never_unloaded(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path, unload_idle_s=1) as control:
            plane, loader = control.dataplane, control.dataplane.loader
            await with_copies(control, digits, ["v1", "v2", "v3"])
            await control.set_traffic("digits", {"baseline": 0.5, "v1": 0.5}, ["v2"], None)  # loads v1 and v2 for their routes
            loaded = plane.models["digits"]
            assert set(loaded.variants) == {"baseline", "v1", "v2"} and set(loaded.unloaded) == {"v3"}
            now = time.monotonic()
            loader.unload_idle(now)
            assert loader.unload_idle(now + 1000) == []
            control.repository.update(
                "digits", lambda info: setattr(info, "rollout", {"state": "canary", "variant": "v3", "control": "baseline"})
            )
            assert "v3" in loader.needed(control.repository.get("digits"))
            await control.set_traffic("digits", {"baseline": 1.0}, [], None)
            loader.unload_idle(now)
            assert sorted(loader.unload_idle(now + 1000)) == [("digits", "v1"), ("digits", "v2")]

    run(scenario())


def test_concurrent_pinned_requests_share_one_load(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path) as control:
            await with_copies(control, digits, ["v1"])
            loads = counting_loads(control.dataplane)
            _, expected = await logits(control, digits.x_test[:2])
            answers = await asyncio.gather(*(logits(control, digits.x_test[:2], "v1") for _ in range(8)))
            assert loads == ["v1"] and control.dataplane.loader.reloads == 1
            assert all(v == "v1" and np.allclose(out, expected, atol=1e-5) for v, out in answers)

    run(scenario())


def test_a_failed_load_on_demand_is_a_precise_error_and_the_model_serves_on(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path) as control:
            await with_copies(control, digits, ["v1"])
            info = control.repository.get("digits")
            control.repository.variant_path(info, "v1").write_bytes(b"not an onnx model")
            for _ in range(2):  # not cached: a second request tries again
                with pytest.raises(Unavailable, match="variant 'v1' of model 'digits' is not loaded and failed to load on demand"):
                    await logits(control, digits.x_test[:1], "v1")
            assert (await logits(control, digits.x_test[:1]))[0] == "baseline"
            assert "v1" in control.dataplane.models["digits"].unloaded and not control.dataplane.loader._reloading

    run(scenario())


def test_a_traffic_change_to_an_unloaded_variant_loads_it_for_its_route(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path) as control:
            await with_copies(control, digits, ["v1"])
            assert (await control.promote("digits", "v1")).weights == {"v1": 1.0}
            assert (await logits(control, digits.x_test[:1]))[0] == "v1"
            assert "baseline" in control.dataplane.models["digits"].variants  # still loaded: unloaded only once idle

    run(scenario())


def test_deleting_an_unloaded_variant_forgets_it_and_its_series(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path) as control:
            await with_copies(control, digits, ["v1"])
            await logits(control, digits.x_test[:1], "v1")
            control.dataplane.loader.unload_idle(0.0)
            control.dataplane.loader.unload_idle(1e9)
            assert "v1" in control.dataplane.models["digits"].unloaded
            metrics = control.dataplane.loader.metrics
            labels = {"model": "digits", "variant": "v1", "node_type": "cpu"}
            assert metrics.registry.get_sample_value("slimserve_request_duration_seconds_count", labels) == 1
            await control.delete_variant("digits", "v1")
            assert "v1" not in control.dataplane.models["digits"].ready
            assert metrics.registry.get_sample_value("slimserve_request_duration_seconds_count", labels) is None

    run(scenario())


def test_without_the_setting_every_ready_variant_stays_loaded(tmp_path, digits):
    async def scenario():
        async with lazy_control(tmp_path, unload_idle_s=0) as control:
            await with_copies(control, digits, ["v1", "v2"])
            loaded = control.dataplane.models["digits"]
            assert set(loaded.variants) == {"baseline", "v1", "v2"} and not loaded.unloaded
            assert control.dataplane.loader.unload_idle(time.monotonic() + 1e6) == []

    run(scenario())


async def wait_until_async(condition, what: str) -> None:
    """Polls a state the loader or runtime reports (the reaper and the batcher's close run on this loop)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after 10 s waiting until {what}")
