"""The data plane: routes an inference request to a loaded variant, checks its inputs, and runs it.

Loading and swapping live in server/inference/loader.py, shadow mirroring in server/inference/shadow.py, and what is
measured in server/telemetry/recording.py; this module holds the per-request path that ties them together.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from time import perf_counter, time_ns
from typing import Any

import numpy as np

from slimserve.client.codec import DATATYPE_TO_NUMPY, TensorCodecError, datatype_of
from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.batching.batcher import DynamicBatcher
from slimserve.server.errors import ErrorKind, FailedPrecondition, InvalidArgument, NotFound, SlimServeError, Unavailable
from slimserve.server.inference import classification
from slimserve.server.inference.loaded import LoadedModel, ServedVariant, UnloadedVariant, VariantUnloaded
from slimserve.server.inference.loader import ModelLoader
from slimserve.server.inference.model_config import ModelConfigView, ServingOverride, batchable, config_view, parse_load_config
from slimserve.server.inference.shadow import ShadowMirror, top1
from slimserve.server.inference.shared_memory import SharedMemoryRegions, ShmInput, ShmRef
from slimserve.server.runtimes import Runtime, RuntimeConfig, TensorSpec
from slimserve.server.store.repository import Repository
from slimserve.server.telemetry.metrics import Metrics
from slimserve.server.telemetry.recording import ServingLoad, VariantRecorder
from slimserve.server.telemetry.statistics import DEFAULT_FEEDBACK_IDS, FeedbackStore, VariantStats
from slimserve.server.telemetry.tracing import RequestTrace, Tracer

log = logging.getLogger(__name__)

# Threads of the management pool: a registration and a load (or a watcher's poll) at once.
MANAGEMENT_THREADS = 2

_NO_SHADOWS: tuple[ServedVariant, ...] = ()


# The per-request records are slotted and not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__, about a microsecond a request for these three. Nothing changes them once made.


@dataclass(slots=True)
class InferRequest:
    """One inference request, decoded from its protocol (server/grpc/converters.py builds it)."""

    model: str
    version: str  # a variant name or its integer version; empty: the router chooses
    id: str  # the client's id; empty: the server makes one up
    # Decodes the input tensors; called once the request is routed, so that a malformed tensor counts as
    # the variant's INVALID_ARGUMENT like every other refused request.
    decode_inputs: Callable[[], dict[str, np.ndarray]]
    outputs: list[str] | None = None  # the outputs asked for; None: all
    parameters: Mapping[str, Any] | None = None  # plain python values (str, int, float, bool)
    classification: Mapping[str, int] | None = None  # output -> class_count (Triton's classification extension)
    shm_inputs: Mapping[str, ShmInput] | None = None  # inputs read from registered shared memory
    shm_outputs: Mapping[str, ShmRef] | None = None  # outputs written to registered shared memory
    deadline: float | None = None  # perf_counter() seconds by which to answer (gRPC's deadline); see request_deadline
    trace: RequestTrace | None = None  # stamps of a sampled request (server/telemetry/tracing.py); None: not traced
    # perf_counter() when the transport received it, where it is earlier than `serve` (REST: before the body is read and
    # decoded); the `timeout` parameter counts from it. None: from `serve`'s start.
    arrived: float | None = None
    # Set by `serve` for an answered request with a deadline: the transport calls it once the answer has left (gRPC: its
    # done callback, with the context; REST: once encoded), which measures the variant's time after compute
    # (DynamicBatcher.answer_left).
    on_sent: Callable[..., None] | None = None


@dataclass(slots=True)
class Call:
    """One inference request's destination, fixed when it arrives (a swap later does not move it)."""

    model: str
    variant: str
    runtime: Runtime
    batcher: DynamicBatcher
    request_id: str
    feedback: FeedbackStore
    # Variants mirroring this request (routed traffic only; a request pinned by model_version is not mirrored).
    shadows: tuple[ServedVariant, ...] = ()
    recorder: VariantRecorder | None = None  # where the request is counted (serve counts it)


@dataclass(slots=True)
class InferResult:
    model: str
    variant: str
    outputs: dict[str, np.ndarray]
    specs: dict[str, TensorSpec]
    request_id: str  # the client's id, or the one the server gave the request
    in_shared_memory: frozenset[str] = frozenset()  # outputs written to shared memory (answered without data)


@dataclass(frozen=True)
class VersionStatistics:
    """ModelStatistics of one served variant (Triton's version), cumulative since it was loaded."""

    model: str
    version: int
    variant: str
    stats: VariantStats


@dataclass(frozen=True)
class ModelMetadata:
    """What ModelMetadata answers: the model's served variants and the inputs / outputs of the one asked for."""

    name: str
    versions: list[str]  # integer versions, then variant names
    runtime: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def check_inputs(model: str, specs: list[TensorSpec], arrays: dict[str, np.ndarray]) -> None:
    """Names, datatypes and shapes of a request against the model's inputs, with a precise message."""
    # The common case first, in plain comparisons: each input present once, of exactly its numpy dtype (which
    # also fixes its datatype: the table is one to one) and of a fitting shape. Anything else is looked at
    # closely below, which passes what it should (BYTES given as str arrays) and names what is wrong.
    if len(arrays) == len(specs):
        for spec in specs:
            array = arrays.get(spec.name)
            if array is None or array.dtype != DATATYPE_TO_NUMPY[spec.datatype] or not _fits(spec.shape, array.shape):
                break
        else:
            return
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
        if got_type != spec.datatype or not _fits(spec.shape, array.shape):
            raise InvalidArgument(
                f"input '{spec.name}': expected {spec.describe()}, got {got_type} [{','.join(str(d) for d in array.shape)}]"
            )
        if want.kind != "O" and array.dtype != want:
            raise InvalidArgument(f"input '{spec.name}': expected {spec.describe()}, got numpy {array.dtype}")


def _fits(expected: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """A shape against a spec's, -1 matching any extent."""
    if len(expected) != len(shape):
        return False
    for want, got in zip(expected, shape):  # noqa: SIM110  a loop, not all() over a generator: half the cost
        if want != got and want != -1:
            return False
    return True


class DataPlane:
    """Routes and runs inference requests over the models the loader holds. Knows nothing of gRPC."""

    def __init__(
        self,
        repository: Repository,
        runtime_config: RuntimeConfig,
        metrics: Metrics,
        compute_threads: int = 2,
        batching: BatchingConfig | None = None,
        inline_compute_s: float = 0.5e-3,
        max_concurrent_calls: int = 1,
        unload_idle_s: float = 0.0,
        feedback_ids: int = DEFAULT_FEEDBACK_IDS,
    ) -> None:
        self.repository = repository
        self.serving_load = ServingLoad()  # requests answered and their seconds, for the job yield
        self.executor = ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix="compute")
        # Management's blocking work (registration's checks and commit, model loads, manifest writes, the watcher's
        # polls) has a pool of its own, so that an inference never waits in the compute pool's queue behind it.
        self.management = ThreadPoolExecutor(max_workers=MANAGEMENT_THREADS, thread_name_prefix="management")
        self._background: set[asyncio.Task] = set()  # batchers closing, shadow calls
        self.loader = ModelLoader(
            repository,
            runtime_config,
            metrics,
            self.executor,
            self.management,
            self._spawn,
            batching or BatchingConfig(),
            inline_compute_s,
            max_concurrent_calls,
            unload_idle_s,
            feedback_ids,
        )
        self.shadows = ShadowMirror(self._spawn)
        self.shared_memory = SharedMemoryRegions()
        self.not_at_start: set[str] = set()  # models loaded only when a load names them (Triton's explicit mode)
        self.tracer: Tracer | None = None  # with --trace-endpoint (server/app.py): the transports begin and finish traces with it
        # Ids for requests that came without one: a per-process random prefix and a counter
        # (uuid4 per request costs a getrandom() system call).
        self._id_prefix = uuid.uuid4().hex[:12] + "-"
        self._id_counter = itertools.count(1)
        self.ready = False
        self.draining = False  # SIGTERM: requests in flight finish, new ones are refused UNAVAILABLE (server/app.py `drain`)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for name in self.repository.names():
            if name in self.not_at_start:
                continue
            try:
                await self.load_model(name)
            except Exception as e:  # one broken model must not keep the others from serving
                log.error("model '%s' failed to load: %s", name, e)
        self.ready = True

    def requests_in_flight(self) -> int:
        """Requests routed to a served variant and not yet answered, over every loaded model."""
        return sum(v.recorder.inflight for loaded in list(self.loader.models.values()) for v in list(loaded.variants.values()))

    async def stop(self) -> None:
        self.ready = False
        for name in list(self.models):
            await self.unload_model(name)
        if self._background:  # batchers finishing their queues; shadows finishing their calls
            await asyncio.gather(*self._background, return_exceptions=True)
        self.executor.shutdown(wait=True)
        self.management.shutdown(wait=True)
        self.shared_memory.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def run_blocking(self, fn, *args):
        """Runs management's blocking `fn` on the management pool, never on the compute pool that runs the models."""
        return await asyncio.get_running_loop().run_in_executor(self.management, fn, *args)

    @property
    def models(self) -> Mapping[str, LoadedModel]:
        """The loaded models by name (read-only: change the set with load_model / refresh / unload_model)."""
        return self.loader.models

    async def load_model(self, name: str, override: ServingOverride | None = None) -> LoadedModel:
        """Loads every ready variant afresh and swaps them in (RepositoryModelLoad), with the serving settings a load
        `config` gave (None: those stored with the model, a Triton config or a registration's, else the server's own);
        statistics of a loaded one are kept."""
        return await self.loader.load(name, override=override if override is not None else self.stored_override(name))

    def stored_override(self, name: str) -> ServingOverride | None:
        """The serving settings stored with a model (`Repository.serving`), checked against it; None when it has none."""
        serving = self.repository.serving(name)
        if not serving:
            return None
        info = self.repository.get(name)
        files = {k: base64.b64decode(v) for k, v in serving.get("files", {}).items()}
        device = self.loader.runtime_config.device
        return parse_load_config(serving["config"], name, info.inputs, device, self.loader.batching, info.outputs, files)

    async def refresh(self, name: str) -> LoadedModel:
        """Re-reads a model's manifest after a change (new variant, new routing); loads only what is new."""
        return await self.loader.load(name, reuse=True)

    async def unload_model(self, name: str) -> None:
        await self.loader.unload(name)

    def is_loaded(self, name: str) -> bool:
        return name in self.loader.models

    # ------------------------------------------------------------------ queries

    def loaded_model(self, name: str) -> LoadedModel:
        loaded = self.loader.models.get(name)
        if loaded is None:
            if name in self.repository.names():
                raise Unavailable(f"model '{name}' is registered but not loaded; load it with RepositoryModelLoad")
            raise NotFound(f"Request for unknown model: '{name}' is not registered")
        return loaded

    def resolve(self, name: str, version: str) -> tuple[LoadedModel, ServedVariant]:
        """The variant `version` names, or the one the router's largest share goes to."""
        loaded = self.loaded_model(name)
        variant = version or loaded.info.default_variant
        if not version and loaded.router is not None and variant not in loaded.variants:
            variant = loaded.router.choose(None)
        return loaded, loaded.pinned(variant)

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.resolve(name, version)
        except (NotFound, FailedPrecondition, Unavailable):
            return False
        return True

    def _described(self, name: str, version: str) -> tuple[LoadedModel, ServedVariant | UnloadedVariant]:
        """The variant `version` names as `resolve` finds it, or its record while it is unloaded (what it serves when pinned)."""
        try:
            return self.resolve(name, version)
        except VariantUnloaded as e:
            loaded = self.loaded_model(name)
            return loaded, loaded.unloaded[e.variant]

    def metadata(self, name: str, version: str) -> ModelMetadata:
        loaded, served = self._described(name, version)
        inputs, outputs = (
            (served.inputs, served.outputs) if isinstance(served, UnloadedVariant) else (served.runtime.inputs, served.runtime.outputs)
        )
        info = loaded.info
        # Every variant that takes requests by its integer version (as Triton's tools expect), then by its name (both pin it).
        ready = [v for v in info.variants if v in loaded.variants or v in loaded.unloaded]
        versions = [str(info.variants[v].version) for v in ready] + ready
        return ModelMetadata(name, versions, info.variants[served.name].runtime, inputs, outputs)

    def model_config(self, name: str, version: str = "") -> ModelConfigView:
        """Triton's ModelConfig of the variant `version` names (or the router's main one), as it serves now (or will serve,
        when unloaded while idle)."""
        loaded, served = self._described(name, version)
        info = loaded.info.variants[served.name]
        override = self.loader.overrides.get(name)  # input formats and label files a load `config` declared
        if isinstance(served, UnloadedVariant):
            return config_view(name, info, served.inputs, served.outputs, served.batching, served.calls, served.device, override)
        batcher = served.batcher
        runtime = served.runtime
        return config_view(
            name,
            info,
            runtime.inputs,
            runtime.outputs,
            batcher.config,
            batcher.max_concurrency,
            runtime.device,
            override,
            runtime.config_parameters,
        )

    def statistics(self, name: str = "", version: str = "") -> list[VersionStatistics]:
        """Triton's ModelStatistics: every served variant of every loaded model, or of one model, or one variant."""
        if version and not name:
            raise InvalidArgument("statistics: a version needs a model name")
        rows = []
        for loaded in [self.loaded_model(name)] if name else list(self.loader.models.values()):
            if version:
                try:
                    served: list[ServedVariant | UnloadedVariant] = [loaded.pinned(version)]
                except VariantUnloaded as e:
                    served = [loaded.unloaded[e.variant]]
            else:
                served = [*loaded.variants.values(), *loaded.unloaded.values()]
            rows.extend(VersionStatistics(loaded.name, loaded.info.variants[s.name].version, s.name, s.stats) for s in served)
        return rows

    # ------------------------------------------------------------------ inference

    async def serve(self, request: InferRequest) -> InferResult:
        """One inference request, routed, counted and run (with shared memory and classification when asked).

        Written out flat rather than through an async context manager and nested coroutines: each
        of those costs a microsecond or more a request (`python -m bench.bench_hotpath`)."""
        if self.draining:
            raise Unavailable("the server is shutting down and takes no new requests; send this one to another replica")
        trace = request.trace
        if trace is not None:
            trace.started = time_ns()
        try:
            call = self.route(request.model, request.version, request.parameters, request.id)
        except VariantUnloaded as e:  # pinned, out of memory while idle: this request waits for it to load (free when loaded)
            await self.loader.reload(e.model, e.variant)
            call = self.route(request.model, request.version, request.parameters, request.id)
        recorder = call.recorder
        start = perf_counter()
        code = "OK"
        recorder.begin()
        try:
            inputs = request.decode_inputs()
            if request.shm_inputs:
                inputs.update(self.shared_memory.read_inputs(request.shm_inputs))
            counts = request.classification
            if counts:
                batched = batchable(call.runtime.inputs)
                specs = {s.name: s for s in call.runtime.outputs}
                unknown = [o for o in counts if o not in specs]
                if unknown:
                    raise InvalidArgument(f"model '{call.model}' has no output {', '.join(repr(u) for u in unknown)}")
                classification.check(specs, counts, batched)
            specs = self._checked(call, inputs, request.outputs)
            deadline = (
                request_deadline(request, start if request.arrived is None else request.arrived)
                if request.deadline is not None or request.parameters
                else None
            )
            if trace is None:
                if deadline is None:  # the common case, as before deadlines: no third argument
                    answer = await call.batcher.submit(inputs, request.outputs)
                else:
                    timing: list = []
                    answer = await call.batcher.submit(inputs, request.outputs, deadline, timing)
                    self._in_time(call.batcher, request, deadline, timing)  # not encoded and sent past its deadline
                result = self._answered(call, inputs, request.outputs, specs, answer)
            else:
                trace.routed, trace.variant = time_ns(), call.variant
                answer = await call.batcher.submit(inputs, request.outputs, deadline, trace.batch)
                if deadline is not None:
                    self._in_time(call.batcher, request, deadline, trace.batch)
                trace.computed = time_ns()
                result = self._answered(call, inputs, request.outputs, specs, answer)
                if call.shadows:  # the time handing copies to the shadows took (their own calls run after the answer)
                    trace.answered = time_ns()
            if counts:
                override = self.loader.overrides.get(call.model)
                labels = override.labels if override is not None else None
                outputs, specs = classification.apply(result.outputs, result.specs, counts, batched, labels)
                result = replace(result, outputs=outputs, specs=specs)
            if request.shm_outputs:
                for name, ref in request.shm_outputs.items():
                    if name not in result.outputs:
                        raise InvalidArgument(f"output '{name}' in shared memory was not asked for or does not exist")
                    self.shared_memory.write_output(name, result.outputs[name], result.specs[name].datatype, ref)
                result = replace(result, in_shared_memory=frozenset(request.shm_outputs))
            return result
        except BaseException as e:
            code = outcome_code(e)
            raise
        finally:
            seconds = perf_counter() - start
            recorder.record(code, seconds)
            self.serving_load.add(seconds)  # the job yield's view of the traffic (server/management/throttle.py)
            if log.isEnabledFor(logging.DEBUG):  # one line per request, at debug level only (a dict lookup otherwise)
                log.debug("request %s: %s/%s %s in %.3f ms", call.request_id, call.model, call.variant, code, seconds * 1000)

    def route(self, name: str, version: str, parameters: Mapping[str, Any] | None = None, request_id: str = "") -> Call:
        """The variant a request goes to (pinned by `version`, or the router's choice) and its shadows; not yet counted."""
        loaded = self.loader.models.get(name) or self.loaded_model(name)  # the second says why there is none
        shadows = _NO_SHADOWS
        if version:
            served = loaded.pinned(version)  # VariantUnloaded when idle and out of memory: `serve` loads it and routes again
        else:
            router = loaded.router
            if router is None:
                raise Unavailable(f"model '{name}' has no variant loaded that can take traffic")
            served = loaded.variants[router.choose_for(parameters) if parameters else router.choose()]
            if router.shadows:
                shadows = tuple(loaded.variants[s] for s in router.shadows if s in loaded.variants)
        return Call(
            name,
            served.name,
            served.runtime,
            served.batcher,
            request_id or f"{self._id_prefix}{next(self._id_counter)}",
            loaded.feedback,
            shadows,
            served.recorder,
        )

    @staticmethod
    def _in_time(batcher: DynamicBatcher, request: InferRequest, deadline: float, timing: list) -> None:
        """An answer with a deadline, back from the batcher: DeadlineExceeded when its deadline passed meanwhile
        (`check_in_time`); else `request.on_sent` is set, for the transport to report when the answer left."""
        ended = timing[-1][0] + timing[-1][1] if timing else None  # its call's (compute start, seconds, size)
        batcher.check_in_time(deadline, ended)
        if ended is not None:
            request.on_sent = partial(batcher.answer_left, ended)

    def _checked(self, call: Call, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, TensorSpec]:
        """The inputs against the variant's, the outputs asked for against its outputs; its output specs by name."""
        runtime = call.runtime
        check_inputs(call.model, runtime.inputs, inputs)
        specs = {s.name: s for s in runtime.outputs}
        if outputs:
            unknown = [o for o in outputs if o not in specs]
            if unknown:
                raise InvalidArgument(
                    f"model '{call.model}' has no output {', '.join(repr(u) for u in unknown)}; its outputs are: {', '.join(specs)}"
                )
        return specs

    def _answered(
        self,
        call: Call,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
        specs: dict[str, TensorSpec],
        result: dict[str, np.ndarray],
    ) -> InferResult:
        """The answer's top-1 kept for feedback and handed to the shadows."""
        predicted = top1(result)
        if predicted is not None:  # every request can take feedback: one label, or one per row
            if predicted.shape[0] == 1:
                call.feedback.record_prediction(call.request_id, call.variant, int(predicted[0]))
            elif predicted.shape[0] > 1:
                call.feedback.record_rows(call.request_id, call.variant, predicted)
        if call.shadows:
            self.shadows.mirror(call.model, call.request_id, call.shadows, call.feedback, inputs, outputs, predicted)
        return InferResult(call.model, call.variant, result, specs, call.request_id)


def request_deadline(request: InferRequest, arrived: float) -> float | None:
    """The perf_counter() time by which the request must be answered: the earlier of its transport's deadline (gRPC)
    and its `timeout` parameter (microseconds after arrival, as Triton's: `arrived`, the transport's receipt where it
    stamped one, `InferRequest.arrived`); None: no deadline."""
    deadline = request.deadline
    timeout = request.parameters.get("timeout") if request.parameters else None
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or timeout != timeout:
            raise InvalidArgument(
                f"parameter 'timeout' is {timeout!r}: it is the request's deadline in microseconds after arrival, a number > 0 "
                "(e.g. 50000 for 50 ms); leave it out for no deadline"
            )
        by_parameter = arrived + float(timeout) / 1e6
        deadline = by_parameter if deadline is None else min(deadline, by_parameter)
    return deadline


def outcome_code(error: BaseException) -> str:
    """The `code` a failed request is counted under: its error kind, or what a codec error, a cancel or a bug means."""
    if isinstance(error, SlimServeError):
        return error.kind.name
    if isinstance(error, TensorCodecError):
        return ErrorKind.INVALID_ARGUMENT.name
    if isinstance(error, asyncio.CancelledError):  # the caller went away or its deadline passed: not the server's fault
        return ErrorKind.DEADLINE_EXCEEDED.name
    return ErrorKind.INTERNAL.name
