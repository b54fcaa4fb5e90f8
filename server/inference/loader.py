"""Loading and swapping: builds a model's served variants and router, swaps the set in at once, retires what left;
with `unload_idle_s`, keeps variants that no route serves out of memory until a request pins one.

A request resolves its variant and enqueues without yielding to the event loop, so every request
that saw the old set is already queued when a retired batcher closes: a swap never fails one. The
same holds for a variant unloaded while idle: its batcher finishes what it holds before its runtime goes.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.batching.batcher import DynamicBatcher
from slimserve.server.batching.sequence import SequencePlan, plan_for, quantizes_per_call, verify
from slimserve.server.errors import NotFound, SlimServeError, Unavailable
from slimserve.server.inference.loaded import LoadedModel, ServedVariant, UnloadedVariant
from slimserve.server.inference.model_config import ServingOverride, batchable
from slimserve.server.inference.router import Router
from slimserve.server.runtimes import Runtime, RuntimeConfig, TensorSpec, create_runtime
from slimserve.server.store.manifest import BASELINE, ModelInfo
from slimserve.server.store.repository import Repository
from slimserve.server.store.traffic import TrafficPolicy
from slimserve.server.telemetry.metrics import Metrics
from slimserve.server.telemetry.recording import VariantRecorder
from slimserve.server.telemetry.statistics import DEFAULT_FEEDBACK_IDS, FeedbackStore

log = logging.getLogger(__name__)


class ModelLoader:
    """Owns the loaded models by name; every change to that set goes through `load` or `unload`, one at a time."""

    def __init__(
        self,
        repository: Repository,
        runtime_config: RuntimeConfig,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        loads: ThreadPoolExecutor,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task],
        batching: BatchingConfig,
        inline_compute_s: float,
        max_concurrent_calls: int,
        unload_idle_s: float = 0.0,
        feedback_ids: int = DEFAULT_FEEDBACK_IDS,
    ) -> None:
        self.repository = repository
        self.runtime_config = runtime_config
        self.metrics = metrics
        self.executor = executor  # the compute pool: the batchers run models' predict calls on it
        self.loads = loads  # the management pool: loading a runtime (ORT session, .pt2) never queues before a predict call
        self.spawn = spawn
        self.batching = batching
        self.inline_compute_s = inline_compute_s
        self.max_concurrent_calls = max_concurrent_calls
        self.models: dict[str, LoadedModel] = {}
        # Serving settings a load's `config` set per model, kept until the next load (refreshes keep them).
        self.overrides: dict[str, ServingOverride] = {}
        self._lock = asyncio.Lock()
        # Lazy variants (0: every ready variant stays loaded): an unrouted variant idle this long is unloaded.
        self.unload_idle_s = unload_idle_s
        self.feedback_ids = feedback_ids  # each model's FeedbackStore capacity (--feedback-ids)
        self._reloading: dict[tuple[str, str], asyncio.Task] = {}  # one load per variant, shared by its waiters
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}  # (requests answered, when that count was first seen)
        self._reaper: asyncio.Task | None = None
        self.reloads = 0  # variants loaded again on demand since start
        # Padding-free plans of loaded text variants (batching/sequence.py), made and checked at their load.
        self.sequences: dict[tuple[str, str], SequencePlan] = {}
        self.idle_unloads = 0  # variants unloaded while idle since start

    def load_runtime(self, info: ModelInfo, variant: str, override: ServingOverride | None = None) -> Runtime:
        """A variant's runtime, loaded (blocking: runs on the management pool, `loads`); a load config's intra_op_thread_count wins."""
        config = self.runtime_config
        if override is not None and override.intra_op_threads is not None:
            config = replace(config, intra_op_threads=override.intra_op_threads)
        runtime = create_runtime(info.variants[variant].runtime, self.repository.variant_path(info, variant), config)
        runtime.load()
        self._plan_sequence(info, variant, runtime)
        return runtime

    def _plan_sequence(self, info: ModelInfo, variant: str, runtime: Runtime) -> None:
        """Whether the variant runs each request at its real length: a sequence declared at register or detected by
        name, and cutting checked on made-up rows (a model that reads its padding is served padded)."""
        where = f"variant '{variant}' of '{info.name}'"
        self.sequences.pop((info.name, variant), None)
        try:
            plan = plan_for(runtime.inputs, runtime.outputs, info.sequence, where)
        except SlimServeError as e:  # a declaration the stored file no longer fits (registration checked the baseline)
            log.warning("%s: served padded: %s", where, e)
            return
        if plan is None:
            return
        wrong = verify(runtime.predict, plan, quantized=quantizes_per_call(runtime.path))
        if wrong:
            log.warning("%s: served padded: %s", where, wrong)
            return
        log.info("%s: served padding-free (sequence inputs %s, mask '%s')", where, ", ".join(plan.inputs), plan.mask)
        self.sequences[(info.name, variant)] = plan

    def _serving(self, inputs: list[TensorSpec], override: ServingOverride | None, loading: str = "") -> tuple[BatchingConfig, int]:
        """The batching and concurrent calls a variant with these inputs gets: the settings, a load config's override,
        and no batching without a free batch dimension on every input (said in the log for the variant `loading`)."""
        config, calls = override.apply(self.batching, self.max_concurrent_calls) if override else (self.batching, self.max_concurrent_calls)
        if config.enabled and not batchable(inputs):
            if loading:
                log.info("%s has a fixed batch dimension: served without batching", loading)
            config = replace(config, enabled=False)
        return config, calls

    def _serve(
        self, model: str, variant: str, runtime: Runtime, recorder: VariantRecorder | None, override: ServingOverride | None
    ) -> ServedVariant:
        """The runtime behind its batcher. Batching needs a free batch dimension on every input."""
        config, calls = self._serving(runtime.inputs, override, f"variant '{variant}' of '{model}'")
        # A reload of a loaded variant keeps its statistics and series (RepositoryModelLoad is not a deletion).
        recorder = recorder or VariantRecorder(self.metrics, model, variant)
        batcher = DynamicBatcher(
            runtime.predict,
            self.executor,
            config,
            model=model,
            variant=variant,
            max_concurrency=calls,
            on_batch=recorder.record_batch,
            on_drop=recorder.record_drop,
            inline_below_s=self.inline_compute_s if runtime.inline_safe else 0.0,
            sequence=self.sequences.get((model, variant)),
        )
        recorder.watch_queue(lambda: batcher.queued, config.max_queue_size)
        return ServedVariant(variant, runtime, batcher, recorder)

    async def load(self, name: str, reuse: bool = False, override: ServingOverride | None = None) -> LoadedModel:
        """Loads every ready variant of a model and swaps the set in at once, with a router from its policy.

        With `reuse`, variants already loaded keep their runtime and batcher (a refresh after a new
        variant or a routing change); otherwise every variant is loaded afresh (RepositoryModelLoad).
        Either way a variant still served keeps its statistics, and the model its feedback. A load (not a
        refresh) sets the model's serving override, or clears it when `override` is None.
        """
        async with self._lock:
            if reuse:
                override = self.overrides.get(name)
            info = self.repository.get(name)
            old = self.models.get(name)
            loaded = LoadedModel(info, feedback=old.feedback if old is not None else FeedbackStore(self.feedback_ids))
            loop = asyncio.get_running_loop()
            needed = self.needed(info)
            unloaded: dict[str, UnloadedVariant] = {}
            for variant, v in info.variants.items():
                if v.status != "ready":
                    continue
                current = old.variants.get(variant) if old is not None else None
                parked = old.unloaded.get(variant) if old is not None else None
                recorder = current.recorder if current is not None else (parked.recorder if parked is not None else None)
                if variant not in needed and (current is None or not reuse):
                    # No route serves it: it stays out of memory until a request pins it (a refresh keeps it loaded if it is).
                    unloaded[variant] = (parked if reuse and parked is not None else None) or self._unloaded(
                        info, variant, recorder, override, "not loaded yet: no route serves it"
                    )
                    continue
                if current is None or not reuse:
                    runtime = await loop.run_in_executor(self.loads, self.load_runtime, *_runtime_args(info, variant, override))
                    current = self._serve(name, variant, runtime, recorder, override)
                loaded.variants[variant] = current
            loaded.unloaded = unloaded
            loaded.router = router_of(loaded)
            weights = loaded.router.policy.weights if loaded.router else {}
            for variant, served in [*loaded.variants.items(), *unloaded.items()]:
                served.recorder.describe(info.variants[variant], weights.get(variant, 0.0))
            self.models[name] = loaded
            if override is None:
                self.overrides.pop(name, None)
            else:
                self.overrides[name] = override
        if old is not None:
            self._retire(old, loaded)
        if unloaded:
            log.info("model '%s' loaded: variants %s; loaded on demand: %s", name, ", ".join(loaded.variants), ", ".join(unloaded))
        else:
            log.info("model '%s' loaded: variants %s", name, ", ".join(loaded.variants))
        if self.unload_idle_s > 0 and (self._reaper is None or self._reaper.done()):
            self._reaper = self.spawn(self._reap_idle())
        return loaded

    async def unload(self, name: str) -> None:
        """Stops serving a model; its statistics, feedback and series go with it."""
        async with self._lock:
            loaded = self.models.pop(name, None)
            self.overrides.pop(name, None)
        if loaded is None:
            raise NotFound(f"model '{name}' is not loaded")
        self._retire(loaded, LoadedModel(loaded.info))
        for key in [k for k in self._seen if k[0] == name]:
            del self._seen[key]
        if not self.models and self._reaper is not None:  # nothing left to watch (and the server's stop waits for its tasks)
            self._reaper.cancel()
            self._reaper = None

    def _retire(self, old: LoadedModel, new: LoadedModel) -> None:
        """What `old` served and `new` does not: batchers finish what is queued, then runtimes unload.

        A variant gone from `new` by name also loses its series and feedback tallies, so that one
        re-created under that name starts from zero.
        """
        kept = {id(served) for served in new.variants.values()}
        for variant, served in old.variants.items():
            if variant not in new.ready:
                served.recorder.forget()
                old.feedback.forget_variant(variant)
            if id(served) not in kept:
                self.spawn(_close(served))
        for variant, parked in old.unloaded.items():
            if variant not in new.ready:
                parked.recorder.forget()
                old.feedback.forget_variant(variant)

    # ------------------------------------------------------------------ variants out of memory until pinned

    def needed(self, info: ModelInfo) -> set[str]:
        """The ready variants that stay in memory: all of them, or (with `unload_idle_s`) those a route serves (weight,
        shadow, a running rollout's pair), with the baseline standing in when none of those is ready."""
        ready = {v for v, i in info.variants.items() if i.status == "ready"}
        if self.unload_idle_s <= 0:
            return ready
        routed = {v for v, w in info.traffic.weights.items() if w > 0} | set(info.traffic.shadows)
        rollout = info.rollout or {}
        if rollout.get("state") in ("shadow", "canary"):  # server.rollout.state.ACTIVE (a rollout imports the loader)
            routed |= {rollout.get("variant", ""), rollout.get("control", "")}
        needed = routed & ready
        if not needed and ready:
            needed = {BASELINE if BASELINE in ready else next(iter(ready))}
        return needed

    def _unloaded(
        self, info: ModelInfo, variant: str, recorder: VariantRecorder | None, override: ServingOverride | None, reason: str
    ) -> UnloadedVariant:
        """The record of a variant never loaded here: the model's inputs and outputs, the serving settings it would get."""
        config, calls = self._serving(info.inputs, override)
        recorder = recorder or VariantRecorder(self.metrics, info.name, variant)
        return UnloadedVariant(variant, recorder, list(info.inputs), list(info.outputs), config, calls, "", reason)

    async def reload(self, model: str, variant: str) -> ServedVariant:
        """Loads an unloaded variant again for a request that pinned it; concurrent requests share one load."""
        key = (model, variant)
        task = self._reloading.get(key)
        if task is None:
            task = self.spawn(self._reload(model, variant))
            self._reloading[key] = task
            task.add_done_callback(lambda _: self._reloading.pop(key, None))
        return await asyncio.shield(task)  # a waiter that gives up (deadline) leaves the load to the others

    async def _reload(self, model: str, variant: str) -> ServedVariant:
        loaded = self.models.get(model)
        if loaded is None or variant not in loaded.unloaded:
            return self._settled(model, variant)
        start = time.perf_counter()
        try:
            runtime = await asyncio.get_running_loop().run_in_executor(
                self.loads, self.load_runtime, *_runtime_args(loaded.info, variant, self.overrides.get(model))
            )
        except Exception as e:  # a file gone or broken since: this variant fails, the model and server serve on
            log.error("variant '%s' of model '%s' failed to load on demand: %s", variant, model, e)
            raise Unavailable(f"variant '{variant}' of model '{model}' is not loaded and failed to load on demand: {e}") from e
        async with self._lock:
            current = self.models.get(model)
            parked = current.unloaded.get(variant) if current is not None else None
            if parked is None:  # unloaded, deleted or loaded by a refresh meanwhile
                runtime.unload()
                return self._settled(model, variant)
            served = self._serve(model, variant, runtime, parked.recorder, self.overrides.get(model))
            # Copies, not in-place changes: whoever iterates the old dicts keeps a consistent view.
            current.variants = {**current.variants, variant: served}
            current.unloaded = {k: v for k, v in current.unloaded.items() if k != variant}
            self._seen[(model, variant)] = (served.stats.requests, time.monotonic())
            self.reloads += 1
        log.info("variant '%s' of model '%s' loaded on demand in %.3f s", variant, model, time.perf_counter() - start)
        return served

    def _settled(self, model: str, variant: str) -> ServedVariant:
        """The variant as a load or unload meanwhile left it: served, or why not."""
        current = self.models.get(model)
        if current is None:
            raise Unavailable(f"model '{model}' was unloaded while variant '{variant}' was loading")
        return current.pinned(variant)

    async def _reap_idle(self) -> None:
        """Every tick, unloads the unrouted variants that answered no request for `unload_idle_s` seconds."""
        tick = max(0.02, min(self.unload_idle_s / 4, 1.0))
        while True:
            await asyncio.sleep(tick)
            if not self._lock.locked():  # a load in progress may be reusing a variant: leave them all alone this tick
                try:
                    self.unload_idle(time.monotonic())
                except Exception:  # the reaper must outlive one bad variant: it only saves memory, serving goes on
                    log.exception("unloading idle variants failed")

    def unload_idle(self, now: float) -> list[tuple[str, str]]:
        """Unloads each unrouted variant idle for `unload_idle_s` (answered count unchanged, nothing queued); returns them."""
        done = []
        for name, loaded in list(self.models.items()):
            needed = self.needed(loaded.info)
            for variant, served in list(loaded.variants.items()):
                key = (name, variant)
                if variant in needed:
                    self._seen.pop(key, None)
                    continue
                count = served.stats.requests
                seen = self._seen.get(key)
                if seen is None or seen[0] != count or served.batcher.queued:
                    self._seen[key] = (count, now)
                    continue
                if now - seen[1] < self.unload_idle_s:
                    continue
                runtime, batcher = served.runtime, served.batcher
                parked = UnloadedVariant(
                    variant,
                    served.recorder,
                    runtime.inputs,
                    runtime.outputs,
                    batcher.config,
                    batcher.max_concurrency,
                    runtime.device,
                    f"unloaded after {self.unload_idle_s:g} s without requests: no route serves it",
                )
                loaded.variants = {k: v for k, v in loaded.variants.items() if k != variant}
                loaded.unloaded = {**loaded.unloaded, variant: parked}
                self._seen.pop(key, None)
                self.spawn(_close(served))  # the batcher finishes what it holds, then the runtime lets go of its memory
                self.idle_unloads += 1
                done.append(key)
                log.info("variant '%s' of model '%s' unloaded: idle for %.1f s and no route serves it", variant, name, now - seen[1])
        return done


def router_of(loaded: LoadedModel) -> Router | None:
    """The router of the model's policy over what loaded; if the policy names nothing that did, the baseline takes all."""
    info = loaded.info
    routable = {v: w for v, w in info.traffic.weights.items() if w > 0 and v in loaded.variants}
    if not routable:  # a failed variant
        log.error("model '%s': no variant of its traffic policy is loaded; routing everything to what is", info.name)
        fallback = "baseline" if "baseline" in loaded.variants else next(iter(loaded.variants), None)
        routable = {fallback: 1.0} if fallback else {}
    if not routable:
        return None
    shadows = tuple(s for s in info.traffic.shadows if s in loaded.variants)
    return Router(TrafficPolicy(routable, shadows, info.traffic.sticky_parameter))


async def _close(served: ServedVariant) -> None:
    await served.batcher.close()
    served.runtime.unload()
    _give_back_memory()


def _give_back_memory() -> None:
    """Returns freed heap pages to the OS: glibc keeps what a released ORT session freed (measured: 20 idle variants of
    a 9 MiB MLP left RSS at 566 MiB without it), so unloading would otherwise save little."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_LIBC = _libc()


def _runtime_args(info: ModelInfo, variant: str, override: ServingOverride | None) -> tuple:
    """`load_runtime`'s arguments: the override only when it changes the runtime (its thread count)."""
    return (info, variant) if override is None or override.intra_op_threads is None else (info, variant, override)
