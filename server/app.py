"""Assembles the server: gRPC servicers, health, reflection, the REST port, the metrics endpoint, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from slimserve.optimizer.quiet import quiet_third_party
from slimserve.protos import inference_pb2, inference_pb2_grpc, slimserve_pb2, slimserve_pb2_grpc
from slimserve.server.grpc import triton_converters
from slimserve.server.grpc.auth import TokenAuthInterceptor, read_token, tls_server_credentials
from slimserve.server.grpc.edge import CheckedDecoding
from slimserve.server.grpc.servicers.experiments import ExperimentsServicer, FeedbackServicer
from slimserve.server.grpc.servicers.inference import InferenceServicer
from slimserve.server.grpc.servicers.models import RegistryServicer
from slimserve.server.grpc.servicers.optimizer import OptimizerServicer
from slimserve.server.grpc.servicers.rollout import RolloutServicer
from slimserve.server.grpc.servicers.traffic import TrafficServicer
from slimserve.server.http.routes import Routes
from slimserve.server.http.server import HttpServer, build_app, tls_context
from slimserve.server.inference.dataplane import DataPlane
from slimserve.server.management.control import Control
from slimserve.server.management.jobs import JobManager
from slimserve.server.management.runners import make_runner
from slimserve.server.management.throttle import parse_job_yield
from slimserve.server.management.triton_repository import TritonRepository
from slimserve.server.management.watch import RepositoryWatcher
from slimserve.server.management.worker import WorkLimits
from slimserve.server.ports import check_ports, in_use, unsent_bytes
from slimserve.server.rollout.controller import RolloutController
from slimserve.server.rollout.gates import ProcessStatistics
from slimserve.server.rollout.metrics import RolloutMetrics
from slimserve.server.rollout.prometheus import PrometheusStatistics
from slimserve.server.rollout.slo_controller import SloController
from slimserve.server.settings import Settings
from slimserve.server.store.repository import Repository
from slimserve.server.store.upload import Registrar
from slimserve.server.telemetry.metrics import Metrics
from slimserve.server.telemetry.pricing import load_prices, price_of
from slimserve.server.telemetry.tracing import TraceCollector, Tracer, TraceSettings

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.01
DRAIN_SETTLE_S = 0.5  # after the last answer of a drain is acknowledged, for its client to read it before the close

SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    slimserve_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name,
    slimserve_pb2.DESCRIPTOR.services_by_name["Optimizer"].full_name,
    slimserve_pb2.DESCRIPTOR.services_by_name["Traffic"].full_name,
    slimserve_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name,
    slimserve_pb2.DESCRIPTOR.services_by_name["Experiments"].full_name,
    slimserve_pb2.DESCRIPTOR.services_by_name["Rollout"].full_name,
)


def protobuf_backend() -> str:
    """'upb' (C), 'cpp' or 'python': which implementation parses and serializes every request."""
    from google.protobuf.internal import api_implementation

    return api_implementation.Type()


def warn_if_slow_protobuf() -> None:
    backend = protobuf_backend()
    if backend == "python":  # 10x+ slower per message; PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python or a wheel without C
        log.warning(
            "protobuf runs its pure-Python implementation: every request pays for it; unset "
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION or install a protobuf wheel with upb (the default on PyPI)"
        )


class SlimServer:
    """One slimserve process: `await start()`, then `await wait()` or `await stop()`."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        quiet_third_party()  # once per process: the libraries' own chatter, not ours (optimizer/quiet.py)
        self.settings = settings
        self.prices = load_prices(settings.prices)
        self.price = price = price_of(settings.node_type, self.prices)
        # A fresh Prometheus CollectorRegistry per server unless one is given: tests run several servers in one process.
        self.metrics = Metrics(registry, node_type=settings.node_type, price_per_hour=price)
        self.repository = Repository(settings.repository, read_only=settings.read_only)
        self.dataplane = DataPlane(
            self.repository,
            settings.runtime_config(),
            self.metrics,
            settings.compute_threads,
            settings.batching_config(),
            max_concurrent_calls=settings.max_concurrent_calls,
            unload_idle_s=settings.unload_idle_variants_s,
            feedback_ids=settings.feedback_ids,
            inline_compute_s=settings.inline_compute_ms / 1000.0,
        )
        self.registrar = Registrar(self.repository, settings.runtime_config(), settings.max_upload_bytes)
        limits = WorkLimits(threads=settings.job_threads(), nice=settings.job_nice, memory_mb=settings.job_memory_mb)
        runner = make_runner(settings.job_runner, limits, cpus=settings.job_cpus, gpus=settings.job_gpus, memory_mb=settings.job_memory_mb)
        self.jobs = JobManager(
            self.repository,
            self.dataplane,
            settings.runtime_config(),
            runner,
            max_jobs=settings.max_jobs,
            job_yield=parse_job_yield(settings.job_yield),
            job_yield_busy=settings.job_yield_busy,
            metrics=self.metrics,
        )
        self.control = Control(self.repository, self.dataplane, self.registrar, self.jobs, settings.node_type, price, settings.server_name)
        statistics = PrometheusStatistics(settings.prometheus_url) if settings.prometheus_url else ProcessStatistics(self.dataplane)
        self.rollouts = RolloutController(self.repository, self.control, statistics, metrics=RolloutMetrics(self.metrics))
        self.slo = SloController(
            self.repository, self.control, statistics, self.rollouts, on_shift=self._slo_shift, waits=self._predicted_waits
        )
        self.control.on_manual_change = self._manual_change  # the rollout stops, the SLO steps aside
        # Triton's trace settings; spans only with --trace-endpoint (then every request the rate picks is traced).
        self.control.traces = TraceSettings("TIMESTAMPS" if settings.trace_endpoint else "OFF", settings.trace_rate)
        self.control.restore_trace_settings()  # what earlier trace settings updates stored in the repository
        self.tracer = Tracer(self.control.traces, settings.trace_endpoint) if settings.trace_endpoint else None
        self.dataplane.tracer = self.tracer
        if self.tracer is not None:
            self.metrics.registry.register(TraceCollector(self.tracer))
        self.triton: TritonRepository | None = None
        if settings.model_repository is not None:
            self.triton = TritonRepository(
                settings.model_repository,
                settings.model_control_mode,
                self.repository,
                self.registrar,
                self.dataplane,
                settings.runtime_config(),
                triton_converters.parse_config_pbtxt,
                settings.repository_poll_secs,
            )
            self.control.model_control_mode = settings.model_control_mode  # none / poll refuse load and unload, as Triton
            self.control.unserved = self.triton.unserved
        # Read now, so that a bad --tls-* file stops the start with its reason before anything listens.
        self.credentials = tls_server_credentials(settings.tls_cert, settings.tls_key, settings.tls_ca)
        self.watcher: RepositoryWatcher | None = None
        self.auth = TokenAuthInterceptor(read_token(settings.token_file), settings.protect_inference) if settings.token_file else None
        self.port: int | None = None
        self.http_port: int | None = None
        self.http: HttpServer | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None
        self.server: grpc.aio.Server | None = None

    async def _manual_change(self, model: str, reason: str, variant: str | None = None) -> None:
        """A manual routing change or deletion: a running rollout stops with its reason, a latency objective steps aside."""
        await self.rollouts.interrupted(model, reason, variant)
        await self.slo.manual_change(model, reason, variant)

    def _predicted_waits(self, model: str) -> dict[str, float | None]:
        """Each served variant's predicted queue wait in seconds (its batcher's estimate): what the SLO loop reads."""
        return {name: v.batcher.predicted_wait() for name, v in self.dataplane.loaded_model(model).variants.items()}

    def _slo_shift(self, model: str, variant: str, reason: str) -> None:
        """One change of the SLO steering, counted in slimserve_slo_shifts_total."""
        self.metrics.slo_shifts.labels(model, variant, self.metrics.node_type, reason).inc()

    def _build_server(self) -> grpc.aio.Server:
        """The grpc.aio server; built inside the running event loop, which it binds to."""
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            # grpc sets SO_REUSEPORT by default: a second server on a busy port would listen beside the first and take
            # half its calls. Exclusive unless --reuse-port asks for several processes on one port.
            ("grpc.so_reuseport", 1 if self.settings.reuse_port else 0),
        ]
        server = grpc.aio.server(options=options, interceptors=[self.auth] if self.auth is not None else [])
        checked = CheckedDecoding(server)  # request bytes that do not parse: INVALID_ARGUMENT, not UNKNOWN
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.dataplane, self.control), checked)
        slimserve_pb2_grpc.add_ModelRegistryServicer_to_server(RegistryServicer(self.control), checked)
        slimserve_pb2_grpc.add_OptimizerServicer_to_server(OptimizerServicer(self.control), checked)
        slimserve_pb2_grpc.add_TrafficServicer_to_server(TrafficServicer(self.control), checked)
        slimserve_pb2_grpc.add_FeedbackServicer_to_server(FeedbackServicer(self.control), checked)
        slimserve_pb2_grpc.add_ExperimentsServicer_to_server(ExperimentsServicer(self.control), checked)
        slimserve_pb2_grpc.add_RolloutServicer_to_server(
            RolloutServicer(self.rollouts, None if self.settings.read_only else self.slo), checked
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, checked)
        # Through `checked` as every servicer (reflection.enable_server_reflection would register its method with grpc: edge.py says why not).
        reflection_names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(reflection_names), checked)
        return server

    async def start(self) -> None:
        """Listens on every port, or raises PortInUse with nothing left running (no half-started server, no traceback)."""
        check_ports(self.settings)  # before the models load: a busy port stops the start at once
        self.health = health.aio.HealthServicer()
        self.server = self._build_server()
        try:
            await self._start()
        except BaseException:
            await self._abort()
            raise

    def _bind_grpc(self) -> None:
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            if self.credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, self.credentials)
        except RuntimeError:  # grpc >= 1.5x raises where older ones returned 0
            self.port = 0
        if self.port == 0:
            raise in_use("gRPC", self.settings.host, self.settings.grpc_port, "--grpc-port")

    async def _abort(self) -> None:
        """Undoes a start that failed part way (the gRPC server bound to this loop must stop before the loop closes)."""
        if self.server is not None:
            await self.server.stop(0)
        await self._stop_http(0)
        if self.watcher is not None:
            await self.watcher.stop()
        await self.rollouts.stop()
        await self.dataplane.stop()
        self.repository.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    async def _start(self) -> None:
        self._bind_grpc()
        if self.settings.metrics_port >= 0:
            try:
                self._metrics_server, _ = start_http_server(self.settings.metrics_port, self.settings.host, registry=self.metrics.registry)
            except OSError as e:
                raise in_use("metrics", self.settings.host, self.settings.metrics_port, "--metrics-port") from e
            self.metrics_port = self._metrics_server.server_port
        if self.triton is not None:  # a Triton repository: what is new or changed comes in before anything loads
            await self.triton.sync()
            self.dataplane.not_at_start = self.triton.skipped_at_start()
        if not self.settings.read_only:  # a Ray cluster that cannot be reached refuses the start, before anything loads
            await self.jobs.start()
        await self.dataplane.start()
        if self.triton is not None:
            self.triton.start_polling()
        self._measure_unmeasured()
        if not self.settings.read_only:  # the writer decides rollouts; replicas follow its routing through the repository
            self.rollouts.resume()
            self.rollouts.start_ticking(self.settings.rollout_interval_s)
            self.slo.resume()
            self.slo.start_ticking()
        if self.settings.poll_repository_s > 0:
            self.watcher = RepositoryWatcher(self.repository, self.dataplane, self.settings.poll_repository_s)
            self.watcher.start()
        await self.server.start()
        if self.settings.http_port >= 0:
            await self._start_http()
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        tls = "plaintext" if self.credentials is None else ("mutual TLS" if self.settings.tls_ca else "TLS")
        log.info(
            "slimserve listening on %s:%s, %s (HTTP on %s, metrics on %s)",
            self.settings.host,
            self.port,
            tls,
            self.http_port,
            self.metrics_port,
        )
        warn_if_slow_protobuf()

    async def _start_http(self) -> None:
        """The REST port: the same data plane, control, token and TLS as gRPC, on this event loop."""
        s = self.settings
        app = build_app(Routes(self.dataplane, self.control).table(), self.auth, s.max_message_bytes)
        self.http = HttpServer(app, tls_context(s.tls_cert, s.tls_key, s.tls_ca))
        self.http_port = await self.http.start(s.host, s.http_port)

    def _measure_unmeasured(self) -> None:
        """Variants whose evaluation a crash or stop cut short are measured again, in the background."""
        if self.settings.read_only:  # the writer measures; a replica only serves
            return
        for name, loaded in self.dataplane.models.items():
            for variant, v in loaded.info.variants.items():
                if v.status == "ready" and not v.evaluation:
                    self.jobs.evaluate_in_background(name, variant)

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets those in flight finish within `grace` seconds, then unloads."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        await self.jobs.stop()
        await self._drain(deadline)
        await self.rollouts.stop()
        await self.slo.stop()
        left = max(0.0, deadline - time.monotonic())
        await asyncio.gather(self.server.stop(left), self._stop_http(left))
        if self.watcher is not None:
            await self.watcher.stop()
        if self.triton is not None:
            await self.triton.stop()
        await self.dataplane.stop()
        if self.tracer is not None:  # sends what is queued; an unreachable endpoint costs at most its export timeout
            await asyncio.to_thread(self.tracer.close)
        self.repository.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    async def _drain(self, deadline: float) -> None:
        """New requests are refused (UNAVAILABLE, for the client to retry elsewhere); those in flight finish, and their
        answers leave the kernel's send queues, before the transports close. gRPC closes a connection as soon as its
        last call ends; once on CI a client on the busy machine lost the answer of the call in flight that way
        (UNAVAILABLE, "GOAWAY ... Server shutdown": tests/server/test_shutdown.py). So the connections stay open
        until the peers have acknowledged every byte and DRAIN_SETTLE_S more (for them to read it), within the grace
        period; a new request meanwhile is refused, as Triton does while it exits."""
        self.dataplane.draining = True
        answered = self.dataplane.requests_in_flight() > 0
        # Polled, not signalled: the count lives in the recorders, on the request path, which must not pay for an event.
        while self.dataplane.requests_in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        ports = [p for p in (self.port, self.http_port) if p and p > 0]
        settle = time.monotonic() + (DRAIN_SETTLE_S if answered else 0.0)
        while time.monotonic() < deadline:
            unsent = unsent_bytes(ports)
            if not unsent and time.monotonic() >= settle:
                return
            await asyncio.sleep(DRAIN_POLL_S)

    async def _stop_http(self, grace: float) -> None:
        if self.http is not None:
            await self.http.stop(grace)

    async def serve_until_signal(self) -> None:
        """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await self.start()
        await stopping.wait()
        log.info("shutting down: finishing calls in flight")
        await self.stop()
