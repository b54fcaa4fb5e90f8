"""Loading and swapping: builds a model's served variants and router, swaps the set in at once, retires what left.

A request resolves its variant and enqueues without yielding to the event loop, so every request
that saw the old set is already queued when a retired batcher closes: a swap never fails one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from server.batch_assembly import BatchingConfig
from server.batching import DynamicBatcher
from server.errors import NotFound
from server.manifest import ModelInfo
from server.metrics import Metrics
from server.model_config import ServingOverride
from server.models import LoadedModel, ServedVariant
from server.recording import VariantRecorder
from server.repository import Repository
from server.routing import Router, TrafficPolicy
from server.runtimes import Runtime, RuntimeConfig, create_runtime

log = logging.getLogger(__name__)


class ModelLoader:
    """Owns the loaded models by name; every change to that set goes through `load` or `unload`, one at a time."""

    def __init__(
        self,
        repository: Repository,
        runtime_config: RuntimeConfig,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task],
        batching: BatchingConfig,
        inline_compute_s: float,
        max_concurrent_calls: int,
    ) -> None:
        self.repository = repository
        self.runtime_config = runtime_config
        self.metrics = metrics
        self.executor = executor
        self.spawn = spawn
        self.batching = batching
        self.inline_compute_s = inline_compute_s
        self.max_concurrent_calls = max_concurrent_calls
        self.models: dict[str, LoadedModel] = {}
        # Serving settings a load's `config` set per model, kept until the next load (refreshes keep them).
        self.overrides: dict[str, ServingOverride] = {}
        self._lock = asyncio.Lock()

    def load_runtime(self, info: ModelInfo, variant: str) -> Runtime:
        """A variant's runtime, loaded (blocking: runs on the compute pool)."""
        runtime = create_runtime(info.variants[variant].runtime, self.repository.variant_path(info, variant), self.runtime_config)
        runtime.load()
        return runtime

    def _serve(
        self, model: str, variant: str, runtime: Runtime, recorder: VariantRecorder | None, override: ServingOverride | None
    ) -> ServedVariant:
        """The runtime behind its batcher. Batching needs a free batch dimension on every input."""
        config, calls = override.apply(self.batching, self.max_concurrent_calls) if override else (self.batching, self.max_concurrent_calls)
        batchable = all(s.shape and s.shape[0] == -1 for s in runtime.inputs)
        if config.enabled and not batchable:
            log.info("variant '%s' of '%s' has a fixed batch dimension: served without batching", variant, model)
            config = replace(config, enabled=False)
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
            inline_below_s=self.inline_compute_s if runtime.inline_safe else 0.0,
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
            loaded = LoadedModel(info, feedback=old.feedback) if old is not None else LoadedModel(info)
            loop = asyncio.get_running_loop()
            for variant, v in info.variants.items():
                if v.status != "ready":
                    continue
                current = old.variants.get(variant) if old is not None else None
                if current is None or not reuse:
                    runtime = await loop.run_in_executor(self.executor, self.load_runtime, info, variant)
                    current = self._serve(name, variant, runtime, current.recorder if current is not None else None, override)
                loaded.variants[variant] = current
            loaded.router = router_of(loaded)
            weights = loaded.router.policy.weights if loaded.router else {}
            for variant, served in loaded.variants.items():
                served.recorder.describe(info.variants[variant], weights.get(variant, 0.0))
            self.models[name] = loaded
            if override is None:
                self.overrides.pop(name, None)
            else:
                self.overrides[name] = override
        if old is not None:
            self._retire(old, loaded)
        log.info("model '%s' loaded: variants %s", name, ", ".join(loaded.variants))
        return loaded

    async def unload(self, name: str) -> None:
        """Stops serving a model; its statistics, feedback and series go with it."""
        async with self._lock:
            loaded = self.models.pop(name, None)
            self.overrides.pop(name, None)
        if loaded is None:
            raise NotFound(f"model '{name}' is not loaded")
        self._retire(loaded, LoadedModel(loaded.info))

    def _retire(self, old: LoadedModel, new: LoadedModel) -> None:
        """What `old` served and `new` does not: batchers finish what is queued, then runtimes unload.

        A variant gone from `new` by name also loses its series and feedback tallies, so that one
        re-created under that name starts from zero.
        """
        kept = {id(served) for served in new.variants.values()}
        for variant, served in old.variants.items():
            if variant not in new.variants:
                served.recorder.forget()
                old.feedback.forget_variant(variant)
            if id(served) not in kept:
                self.spawn(_close(served))


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
