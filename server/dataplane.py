"""The data plane: loaded variants, input validation, and inference on worker threads."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from client.codec import DATATYPE_TO_NUMPY, TensorCodecError, datatype_of, parameter_value
from server.batching import BatchingConfig, DynamicBatcher
from server.errors import ErrorKind, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, SlimServeError, Unavailable
from server.metrics import Metrics, VariantSeries
from server.repository import ModelInfo, Repository
from server.routing import Router, TrafficPolicy
from server.runtimes import Runtime, RuntimeConfig, TensorSpec, create_runtime
from server.stats import FeedbackStore, LatencyWindow

log = logging.getLogger(__name__)


@dataclass
class VariantStats:
    """What `slimctl compare` reads: the server's own measurements of one variant, since it was loaded."""

    window: LatencyWindow = field(default_factory=LatencyWindow)
    requests: int = 0
    errors: int = 0
    batches: int = 0
    samples: int = 0
    device_seconds: float = 0.0

    @property
    def mean_batch(self) -> float | None:
        """Samples per executed model call."""
        return self.samples / self.batches if self.batches else None

    def answered(self, latency_s: float) -> None:
        self.requests += 1
        self.window.record(latency_s)

    def failed(self) -> None:
        self.requests += 1
        self.errors += 1


@dataclass
class ServedVariant:
    runtime: Runtime
    batcher: DynamicBatcher
    stats: VariantStats
    series: VariantSeries


@dataclass
class LoadedModel:
    info: ModelInfo
    variants: dict[str, ServedVariant] = field(default_factory=dict)
    router: Router | None = None

    @property
    def runtimes(self) -> dict[str, Runtime]:
        return {name: v.runtime for name, v in self.variants.items()}


@dataclass(frozen=True)
class Call:
    """One inference request's destination, fixed when it arrives (a swap later does not move it)."""

    model: str
    variant: str
    runtime: Runtime
    batcher: DynamicBatcher
    request_id: str
    # Variants mirroring this request (routed traffic only; a request pinned by model_version is not mirrored).
    shadows: tuple[tuple[str, ServedVariant], ...] = ()


@dataclass(frozen=True)
class InferResult:
    model: str
    variant: str
    outputs: dict[str, np.ndarray]
    specs: dict[str, TensorSpec]
    request_id: str  # the client's id, or the one the server gave the request


def _plain_value(raw: Any) -> Any:
    """A request parameter as a plain value: an InferParameter message, or already plain (in-process callers)."""
    return raw if isinstance(raw, (str, int, float, bool)) else parameter_value(raw)


def top1(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """Predicted class per sample from a classifier's first output ([N, classes] floats); None otherwise."""
    array = next(iter(outputs.values()), None)
    if array is None or array.ndim < 2 or array.dtype.kind != "f" or array.shape[0] < 1:
        return None
    return array.reshape(array.shape[0], -1).argmax(axis=1)


def check_inputs(model: str, specs: list[TensorSpec], arrays: dict[str, np.ndarray]) -> None:
    """Names, datatypes and shapes of a request against the model's inputs, with a precise message."""
    expected = {s.name for s in specs}
    extra = [n for n in arrays if n not in expected]
    if extra:
        raise InvalidArgument(
            f"model '{model}' has no input {', '.join(repr(e) for e in extra)}; its inputs are: "
            + ", ".join(f"'{s.name}' {s.describe()}" for s in specs)
        )
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None:
            raise InvalidArgument(f"input '{spec.name}' is missing: model '{model}' expects {spec.describe()}")
        want = DATATYPE_TO_NUMPY[spec.datatype]
        got_type = datatype_of(array)
        shape_ok = len(array.shape) == len(spec.shape) and all(d == -1 or d == s for d, s in zip(spec.shape, array.shape))
        if got_type != spec.datatype or not shape_ok:
            raise InvalidArgument(
                f"input '{spec.name}': expected {spec.describe()}, got {got_type} [{','.join(str(d) for d in array.shape)}]"
            )
        if want.kind != "O" and array.dtype != want:
            raise InvalidArgument(f"input '{spec.name}': expected {spec.describe()}, got numpy {array.dtype}")


class DataPlane:
    """Owns what is loaded: runtimes, their batchers, each model's router and live statistics. Knows nothing of gRPC."""

    # Mirrored requests waiting or running at once, per server: beyond it, shadows skip requests rather than pile up.
    MAX_SHADOW_TASKS = 256

    def __init__(
        self,
        repository: Repository,
        runtime_config: RuntimeConfig,
        metrics: Metrics,
        compute_threads: int = 2,
        batching: BatchingConfig | None = None,
        inline_compute_s: float = 0.5e-3,
        max_concurrent_calls: int = 1,
    ) -> None:
        self.repository = repository
        self.runtime_config = runtime_config
        self.metrics = metrics
        self.batching = batching or BatchingConfig()
        self.inline_compute_s = inline_compute_s
        self.max_concurrent_calls = max_concurrent_calls
        # Ids for requests that came without one: a per-process random prefix and a counter
        # (uuid4 per request costs a getrandom() system call).
        self._id_prefix = uuid.uuid4().hex[:12] + "-"
        self._id_counter = itertools.count(1)
        self.models: dict[str, LoadedModel] = {}
        self.stats: dict[str, dict[str, VariantStats]] = {}
        self.feedback: dict[str, FeedbackStore] = {}
        self.executor = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="compute")
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()  # batchers closing, shadow calls
        self._shadow_tasks = 0
        self.ready = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for name in self.repository.names():
            try:
                await self.load_model(name)
            except Exception as e:  # one broken model must not keep the others from serving
                log.error("model '%s' failed to load: %s", name, e)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for name in list(self.models):
            await self.unload_model(name)
        if self._background:  # batchers finishing their queues; shadows finishing their calls
            await asyncio.gather(*self._background, return_exceptions=True)
        self.executor.shutdown(wait=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def run_blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _load_variant(self, info: ModelInfo, variant: str) -> Runtime:
        v = info.variants[variant]
        path = self.repository.model_dir(info.name) / "variants" / variant / v.file
        runtime = create_runtime(v.runtime, path, self.runtime_config)
        runtime.load()
        return runtime

    def _serve(self, model: str, variant: str, runtime: Runtime) -> ServedVariant:
        """The runtime behind its batcher. Batching needs a free batch dimension on every input."""
        config = self.batching
        batchable = all(s.shape and s.shape[0] == -1 for s in runtime.inputs)
        if config.enabled and not batchable:
            log.info("variant '%s' of '%s' has a fixed batch dimension: served without batching", variant, model)
            config = replace(config, enabled=False)
        stats = self.stats.setdefault(model, {}).setdefault(variant, VariantStats())
        series = self.metrics.series(model, variant)
        batcher = DynamicBatcher(
            runtime.predict,
            self.executor,
            config,
            model=model,
            variant=variant,
            max_concurrency=self.max_concurrent_calls,
            on_batch=partial(self._on_batch, series, stats),
            inline_below_s=self.inline_compute_s if runtime.inline_safe else 0.0,
        )
        labels = self.metrics.labels(model, variant)
        self.metrics.queued.labels(**labels).set_function(lambda: batcher.queued)
        self.metrics.queue_capacity.labels(**labels).set(config.max_queue_size)
        return ServedVariant(runtime, batcher, stats, series)

    def _on_batch(self, series: VariantSeries, stats: VariantStats, size: int, queue_seconds: list[float], compute: float) -> None:
        stats.batches += 1
        stats.samples += size
        stats.device_seconds += compute
        self.metrics.observe_batch(series, size, queue_seconds, compute)

    async def load_model(self, name: str, reuse: bool = False) -> LoadedModel:
        """Loads every ready variant of a model and swaps the set in at once, with a router from its policy.

        With `reuse`, variants already loaded keep their runtime and batcher (a refresh after a new
        variant or a routing change); otherwise every variant is loaded afresh (RepositoryModelLoad).
        """
        async with self._lock:
            info = self.repository.get(name)
            old = self.models.get(name)
            loaded = LoadedModel(info)
            for variant, v in info.variants.items():
                if v.status != "ready":
                    continue
                current = old.variants.get(variant) if (reuse and old is not None) else None
                if current is None:
                    runtime = await self.run_blocking(self._load_variant, info, variant)
                    current = self._serve(name, variant, runtime)
                loaded.variants[variant] = current
            routable = {v: w for v, w in info.traffic.weights.items() if w > 0 and v in loaded.variants}
            if not routable:  # the policy names nothing that loaded (a failed variant): the baseline takes it all
                log.error("model '%s': no variant of its traffic policy is loaded; routing everything to what is", name)
                fallback = "baseline" if "baseline" in loaded.variants else next(iter(loaded.variants), None)
                routable = {fallback: 1.0} if fallback else {}
            if routable:
                shadows = tuple(s for s in info.traffic.shadows if s in loaded.variants)
                loaded.router = Router(TrafficPolicy(routable, shadows, info.traffic.sticky_parameter))
            self.models[name] = loaded
            self.feedback.setdefault(name, FeedbackStore())
            self._export_gauges(loaded)
        if old is not None:
            self._release(old, keep=set(loaded.variants))
        log.info("model '%s' loaded: variants %s", name, ", ".join(loaded.variants))
        return loaded

    def _export_gauges(self, loaded: LoadedModel) -> None:
        info = loaded.info
        weights = loaded.router.policy.weights if loaded.router else {}
        for variant in loaded.variants:
            labels = self.metrics.labels(info.name, variant)
            v = info.variants[variant]
            self.metrics.loaded.labels(**labels).set(1)
            self.metrics.model_size.labels(**labels).set(v.size_bytes)
            self.metrics.traffic_weight.labels(**labels).set(weights.get(variant, 0.0))
            if v.evaluation.get("accuracy") is not None:
                self.metrics.offline_accuracy.labels(**labels).set(v.evaluation["accuracy"])
            if v.evaluation.get("flops") is not None:
                self.metrics.flops.labels(**labels).set(v.evaluation["flops"])

    async def unload_model(self, name: str) -> None:
        async with self._lock:
            loaded = self.models.pop(name, None)
        if loaded is None:
            raise NotFound(f"model '{name}' is not loaded")
        self._release(loaded, keep=set())

    def forget_model(self, name: str) -> None:
        """Drops the live statistics of a deleted model."""
        self.stats.pop(name, None)
        self.feedback.pop(name, None)

    def _release(self, loaded: LoadedModel, keep: set[str]) -> None:
        """Retires the variants not kept: their batchers finish what is queued, then the runtime is unloaded.

        A request resolves its variant and enqueues without yielding to the event loop, so every
        request that saw the old set is already queued when its batcher closes: none fails.
        """
        for variant, served in loaded.variants.items():
            if variant not in keep:
                self.metrics.forget(loaded.info.name, variant)
                self._spawn(self._retire(served))
        loaded.variants.clear()

    async def _retire(self, served: ServedVariant) -> None:
        await served.batcher.close()
        served.runtime.unload()

    def forget_variant(self, model: str, variant: str) -> None:
        """Drops the live statistics of a deleted variant, so that a new one of that name starts from zero."""
        self.stats.get(model, {}).pop(variant, None)
        feedback = self.feedback.get(model)
        if feedback is not None:
            feedback.forget_variant(variant)

    async def refresh(self, name: str) -> None:
        """Re-reads a model's manifest after a change (new variant, new routing); loads only what is new."""
        await self.load_model(name, reuse=True)

    # ------------------------------------------------------------------ queries

    def loaded_model(self, name: str) -> LoadedModel:
        loaded = self.models.get(name)
        if loaded is None:
            if name in self.repository.names():
                raise Unavailable(f"model '{name}' is registered but not loaded; load it with RepositoryModelLoad")
            raise NotFound(f"model '{name}' is not registered")
        return loaded

    def _pinned(self, loaded: LoadedModel, variant: str) -> ServedVariant:
        served = loaded.variants.get(variant)
        if served is None:
            name = loaded.info.name
            if variant in loaded.info.variants:
                status = loaded.info.variants[variant].status
                raise FailedPrecondition(f"variant '{variant}' of model '{name}' is {status}, not ready")
            raise NotFound(f"model '{name}' has no variant '{variant}' (variants: {', '.join(loaded.variants)})")
        return served

    def resolve(self, name: str, version: str) -> tuple[LoadedModel, str, Runtime]:
        """The variant `version` names, or the one the router's largest share goes to."""
        loaded = self.loaded_model(name)
        variant = version or loaded.info.default_variant
        if not version and loaded.router is not None and variant not in loaded.variants:
            variant = loaded.router.choose(None)
        return loaded, variant, self._pinned(loaded, variant).runtime

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except (NotFound, FailedPrecondition, Unavailable):
            return False
        return True

    def _route(self, name: str, version: str, parameters: Mapping[str, Any] | None) -> tuple[str, ServedVariant, tuple]:
        loaded = self.loaded_model(name)
        if version:
            return version, self._pinned(loaded, version), ()
        router = loaded.router
        if router is None:
            raise Unavailable(f"model '{name}' has no variant loaded that can take traffic")
        variant = router.choose_for(parameters, _plain_value)
        shadows = tuple((s, loaded.variants[s]) for s in router.shadows if s in loaded.variants)
        return variant, loaded.variants[variant], shadows

    # ------------------------------------------------------------------ inference

    @asynccontextmanager
    async def track(
        self, name: str, version: str, parameters: Mapping[str, Any] | None = None, request_id: str = ""
    ) -> AsyncIterator[Call]:
        """Routes a request to its variant and counts the request, its outcome and its latency."""
        variant, served, shadows = self._route(name, version, parameters)
        stats, series = served.stats, served.series
        start = time.perf_counter()
        code = "OK"
        series.inflight.inc()
        try:
            yield Call(name, variant, served.runtime, served.batcher, request_id or f"{self._id_prefix}{next(self._id_counter)}", shadows)
        except SlimServeError as e:
            code = e.kind.name
            raise
        except TensorCodecError:
            code = ErrorKind.INVALID_ARGUMENT.name
            raise
        except asyncio.CancelledError:  # the caller went away or its deadline passed: not the server's fault
            code = ErrorKind.DEADLINE_EXCEEDED.name
            raise
        except BaseException:
            code = ErrorKind.INTERNAL.name
            raise
        finally:
            elapsed = time.perf_counter() - start
            series.inflight.dec()
            series.request_duration.observe(elapsed)
            if code == "OK":
                series.requests_ok.inc()
                stats.answered(elapsed)
            else:
                self.metrics.requests.labels(**self.metrics.labels(name, variant), code=code).inc()
                stats.failed()

    async def infer(self, call: Call, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> InferResult:
        runtime = call.runtime
        check_inputs(call.model, runtime.inputs, inputs)
        specs = {s.name: s for s in runtime.outputs}
        if outputs:
            unknown = [o for o in outputs if o not in specs]
            if unknown:
                raise InvalidArgument(
                    f"model '{call.model}' has no output {', '.join(repr(u) for u in unknown)}; "
                    f"its outputs are: {', '.join(specs)}"
                )
        result = await call.batcher.submit(inputs, outputs)
        predicted = top1(result)
        if predicted is not None and predicted.shape[0] == 1:
            feedback = self.feedback.get(call.model)
            if feedback is not None:
                feedback.record_prediction(call.request_id, call.variant, int(predicted[0]))
        for shadow, served in call.shadows:
            if self._shadow_tasks >= self.MAX_SHADOW_TASKS:
                log.debug("shadow '%s' of '%s' skipped a request: %d mirrored calls pending", shadow, call.model, self._shadow_tasks)
                continue
            self._shadow_tasks += 1
            self._spawn(self._mirror(call, shadow, served, inputs, outputs, predicted))
        return InferResult(call.model, call.variant, result, specs, call.request_id)

    async def _mirror(
        self, call: Call, shadow: str, served: ServedVariant, inputs: dict[str, np.ndarray],
        outputs: list[str] | None, primary: np.ndarray | None,
    ) -> None:
        """Runs a copy of a request on a shadow after the primary answered; its answer is only compared."""
        start = time.perf_counter()
        try:
            result = await served.batcher.submit(inputs, outputs)
        except (ResourceExhausted, Unavailable) as e:
            log.debug("shadow '%s' of '%s' skipped a request: %s", shadow, call.model, e)
            return
        except Exception as e:  # a shadow failing must never show in the primary's answer
            log.warning("shadow '%s' of '%s' failed: %s", shadow, call.model, e)
            served.stats.failed()
            return
        finally:
            self._shadow_tasks -= 1
        served.stats.answered(time.perf_counter() - start)  # a shadow's latency on the same traffic makes it comparable
        if primary is None:
            return
        predicted = top1(result)
        if predicted is None or predicted.shape != primary.shape:
            return
        served.series.shadow_requests.inc()
        if bool((predicted == primary).all()):
            served.series.shadow_agreements.inc()
        feedback = self.feedback.get(call.model)
        if feedback is not None and predicted.shape[0] == 1:
            feedback.record_shadow(call.request_id, shadow, int(predicted[0]))
