"""The data plane: loaded variants, input validation, and inference on worker threads."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np

from client.codec import DATATYPE_TO_NUMPY, TensorCodecError, datatype_of
from server.errors import ErrorKind, FailedPrecondition, InvalidArgument, NotFound, SlimServeError, Unavailable
from server.metrics import Metrics
from server.repository import ModelInfo, Repository
from server.runtimes import Runtime, RuntimeConfig, TensorSpec, create_runtime

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    info: ModelInfo
    runtimes: dict[str, Runtime] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    """One inference request's destination, fixed when it arrives (a swap later does not move it)."""

    model: str
    variant: str
    runtime: Runtime


@dataclass(frozen=True)
class InferResult:
    model: str
    variant: str
    outputs: dict[str, np.ndarray]
    specs: dict[str, TensorSpec]


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
    """Owns what is loaded. Domain calls only: knows nothing of gRPC."""

    def __init__(self, repository: Repository, runtime_config: RuntimeConfig, metrics: Metrics, compute_threads: int = 2) -> None:
        self.repository = repository
        self.runtime_config = runtime_config
        self.metrics = metrics
        self.models: dict[str, LoadedModel] = {}
        self.executor = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="compute")
        self._lock = asyncio.Lock()
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
        self.executor.shutdown(wait=True)

    async def run_blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _load_variant(self, info: ModelInfo, variant: str) -> Runtime:
        v = info.variants[variant]
        path = self.repository.model_dir(info.name) / "variants" / variant / v.file
        runtime = create_runtime(v.runtime, path, self.runtime_config)
        runtime.load()
        return runtime

    async def load_model(self, name: str, reuse: bool = False) -> LoadedModel:
        """Loads every ready variant of a model and swaps the set in at once.

        With `reuse`, variants already loaded keep their runtime (a refresh after a new variant
        or a routing change); otherwise every variant is loaded afresh (RepositoryModelLoad).
        """
        async with self._lock:
            info = self.repository.get(name)
            old = self.models.get(name)
            loaded = LoadedModel(info)
            for variant, v in info.variants.items():
                if v.status != "ready":
                    continue
                current = old.runtimes.get(variant) if (reuse and old is not None) else None
                loaded.runtimes[variant] = current or await self.run_blocking(self._load_variant, info, variant)
                labels = self.metrics.labels(name, variant)
                self.metrics.loaded.labels(**labels).set(1)
                self.metrics.model_size.labels(**labels).set(v.size_bytes)
            self.models[name] = loaded
        if old is not None:
            self._release(old, keep=set(loaded.runtimes))
        log.info("model '%s' loaded: variants %s", name, ", ".join(loaded.runtimes))
        return loaded

    async def unload_model(self, name: str) -> None:
        async with self._lock:
            loaded = self.models.pop(name, None)
        if loaded is None:
            raise NotFound(f"model '{name}' is not loaded")
        self._release(loaded, keep=set())

    def _release(self, loaded: LoadedModel, keep: set[str]) -> None:
        # Requests in flight hold their own reference to the runtime; unloading only drops ours.
        for variant, runtime in loaded.runtimes.items():
            if variant not in keep:
                self.metrics.forget(loaded.info.name, variant)
        loaded.runtimes.clear()

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

    def resolve(self, name: str, version: str) -> tuple[LoadedModel, str, Runtime]:
        loaded = self.loaded_model(name)
        variant = version or loaded.info.default_variant
        runtime = loaded.runtimes.get(variant)
        if runtime is None:
            if variant in loaded.info.variants:
                status = loaded.info.variants[variant].status
                raise FailedPrecondition(f"variant '{variant}' of model '{name}' is {status}, not ready")
            raise NotFound(f"model '{name}' has no variant '{variant}' (variants: {', '.join(loaded.runtimes)})")
        return loaded, variant, runtime

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except (NotFound, FailedPrecondition, Unavailable):
            return False
        return True

    # ------------------------------------------------------------------ inference

    @asynccontextmanager
    async def track(self, name: str, version: str) -> AsyncIterator[Call]:
        """Resolves the variant a request goes to and counts the request, its outcome and duration."""
        loaded, variant, runtime = self.resolve(name, version)
        labels = self.metrics.labels(name, variant)
        inflight = self.metrics.inflight.labels(**labels)
        start = time.perf_counter()
        code = "OK"
        inflight.inc()
        try:
            yield Call(name, variant, runtime)
        except SlimServeError as e:
            code = e.kind.name
            raise
        except TensorCodecError:
            code = ErrorKind.INVALID_ARGUMENT.name
            raise
        except BaseException:
            code = ErrorKind.INTERNAL.name
            raise
        finally:
            inflight.dec()
            self.metrics.requests.labels(**labels, code=code).inc()
            self.metrics.request_duration.labels(**labels).observe(time.perf_counter() - start)

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
        start = time.perf_counter()
        result = await self.run_blocking(runtime.predict, inputs, outputs)
        self.metrics.compute_duration.labels(**self.metrics.labels(call.model, call.variant)).observe(time.perf_counter() - start)
        return InferResult(call.model, call.variant, result, specs)
