"""Request tracing: Triton's trace settings (level, rate, count; global and per model) and OpenTelemetry spans per request.

A sampled request carries a `RequestTrace` (stamps in nanoseconds, taken as the request passes each stage); its spans are
built only when it is answered, with the stamps as their start and end times: `receive` (the transport decoding),
`route`, `queue`, `compute`, `shadow` (handing copies to shadows, when there are any) and `respond` (encoding), children
of one `infer` span with the model, variant and batch size as attributes. They leave through OpenTelemetry's
`BatchSpanProcessor` to an OTLP/HTTP endpoint (`--trace-endpoint`) on its own thread: an endpoint that cannot be reached
never slows or fails a request; its spans are dropped and counted (`dropped`).

A request that is not sampled costs one dictionary lookup and one comparison (`TraceSettings.sample`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from slimserve.server.errors import InvalidArgument

log = logging.getLogger(__name__)

LEVELS = ("OFF", "TIMESTAMPS")
MODE = "opentelemetry"
KEYS = ("trace_level", "trace_rate", "trace_count", "trace_mode")
STAGES = ("receive", "route", "queue", "compute", "shadow", "respond")


@dataclass
class _Sampler:
    """One scope's settings (the server's, or a model's own) and its counters."""

    level: str = "OFF"
    rate: int = 1000  # one request in `rate` is traced (Triton's trace_rate)
    count: int = -1  # traces left; -1: no limit (Triton's trace_count)
    seen: int = 0
    explicit: set[str] = field(default_factory=set)  # the keys a model set itself (the rest follow the server's)

    def take(self) -> bool:
        if self.level == "OFF" or self.count == 0:
            return False
        self.seen += 1
        if self.seen < self.rate:
            return False
        self.seen = 0
        if self.count > 0:
            self.count -= 1
        return True


class TraceSettings:
    """Triton's trace settings: `get` / `update` for the server (model "") or one model, `sample` per request.

    A model's settings start as a copy of the server's at its first update; a key set to None goes back to the
    server's value. Values are Triton's strings (`trace_rate` "1000"); `trace_level` is a list. TENSORS is refused:
    slimserve records timestamps, not tensors."""

    def __init__(self, level: str = "OFF", rate: int = 1000, count: int = -1) -> None:
        self.server = _Sampler(level, rate, count)
        self.models: dict[str, _Sampler] = {}

    def sample(self, model: str) -> bool:
        return (self.models.get(model) or self.server).take()

    def get(self, model: str = "") -> dict[str, Any]:
        s = self.models.get(model, self.server) if model else self.server
        return {"trace_level": [s.level], "trace_rate": str(s.rate), "trace_count": str(s.count), "trace_mode": MODE}

    def update(self, changes: Mapping[str, Any], model: str = "") -> dict[str, Any]:
        """Checks every change first (nothing changes on an error), applies them, and returns the settings now."""
        parsed = {key: _parse(key, value) for key, value in changes.items()}
        if not model:
            if any(v is None for v in parsed.values()):
                raise InvalidArgument("a server trace setting cannot be cleared (null); clearing applies to a model's own settings")
            for key, value in parsed.items():
                if key != "trace_mode":
                    _set(self.server, key, value)
            for sampler in self.models.values():  # models follow the server where they set nothing themselves
                for key in {"trace_level", "trace_rate", "trace_count"} - sampler.explicit:
                    _set(sampler, key, _value(self.server, key))
            return self.get()
        sampler = self.models.get(model)
        if sampler is None:
            sampler = self.models[model] = _Sampler(self.server.level, self.server.rate, self.server.count)
        for key, value in parsed.items():
            if key == "trace_mode":
                continue
            if value is None:
                sampler.explicit.discard(key)
                _set(sampler, key, _value(self.server, key))
            else:
                sampler.explicit.add(key)
                _set(sampler, key, value)
        if not sampler.explicit:
            del self.models[model]
        return self.get(model)

    def forget(self, model: str) -> None:
        self.models.pop(model, None)


def _value(sampler: _Sampler, key: str) -> Any:
    return {"trace_level": sampler.level, "trace_rate": sampler.rate, "trace_count": sampler.count}[key]


def _set(sampler: _Sampler, key: str, value: Any) -> None:
    if key == "trace_level":
        sampler.level = value
    elif key == "trace_rate":
        sampler.rate, sampler.seen = value, 0
    elif key == "trace_count":
        sampler.count = value


def _parse(key: str, value: Any) -> Any:
    """A setting's value as Triton's clients send it (strings, or a list of strings for trace_level; JSON numbers too)."""
    if value is None or (isinstance(value, list | tuple) and not value and key != "trace_level"):
        return None
    if key == "trace_level":
        levels = [value] if isinstance(value, str) else value
        if not isinstance(levels, list | tuple) or not all(isinstance(v, str) for v in levels):
            raise InvalidArgument(f"trace setting trace_level must be a list of levels ({', '.join(LEVELS)}), got {value!r}")
        if not levels:
            return None
        if "TENSORS" in levels:
            raise InvalidArgument("trace level TENSORS is not recorded by slimserve (spans carry timestamps); use TIMESTAMPS or OFF")
        unknown = [v for v in levels if v not in LEVELS]
        if unknown:
            raise InvalidArgument(f"unknown trace level {unknown[0]!r}; known: {', '.join(LEVELS)}")
        return "TIMESTAMPS" if "TIMESTAMPS" in levels else "OFF"
    if key in ("trace_rate", "trace_count"):
        if isinstance(value, list | tuple) and len(value) == 1:
            value = value[0]
        number = _integer(value)
        low = 1 if key == "trace_rate" else -1
        if number is None or number < low:
            what = "an integer >= 1 (one request in N is traced)" if key == "trace_rate" else "an integer >= -1 (-1: no limit)"
            raise InvalidArgument(f"trace setting {key} must be {what}, got {value!r}")
        return number
    if key == "trace_mode":
        if value not in (MODE, [MODE]):
            raise InvalidArgument(f"trace setting trace_mode is {MODE!r} in slimserve (spans over OTLP), got {value!r}")
        return MODE
    if key in ("trace_file", "log_frequency"):
        raise InvalidArgument(f"trace setting {key} does not apply: slimserve exports spans over OTLP to --trace-endpoint, not to a file")
    raise InvalidArgument(f"unknown trace setting {key!r}; known: {', '.join(KEYS)}")


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


# ------------------------------------------------------------------ spans


class RequestTrace:
    """The stamps of one sampled request (time.time_ns()), filled in as it passes; spans are made from them at the end."""

    __slots__ = ("answered", "batch", "computed", "model", "parent", "received", "routed", "started", "variant")

    def __init__(self, model: str, parent: str | None, received: int) -> None:
        self.model = model
        self.parent = parent  # the caller's W3C traceparent, if it sent one
        self.received = received  # the transport took the request
        self.started = 0  # the data plane took it (decoded)
        self.routed = 0
        self.variant = ""
        self.batch: list[tuple[float, float, int]] = []  # the batcher's (compute start perf_counter, compute seconds, batch size)
        self.computed = 0  # the batcher answered
        self.answered = 0  # the data plane answered (shadows handed their copies)


class Tracer:
    """OpenTelemetry spans of sampled requests, exported over OTLP/HTTP by a BatchSpanProcessor; counts what it drops."""

    def __init__(self, settings: TraceSettings, endpoint: str, exporter: Any = None, service: str = "slimserve") -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.settings = settings
        self.endpoint = endpoint
        self.exported = 0
        self.dropped = 0
        self._lock = threading.Lock()
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=url, timeout=2)
        tracer = self

        class Counting:  # the exporter, counting what arrived and what it dropped
            def export(self, spans: Sequence[Any]) -> Any:
                try:
                    result = exporter.export(spans)
                except Exception as e:  # an exporter must not kill the export thread
                    log.debug("trace export failed: %s", e)
                    result = SpanExportResult.FAILURE
                with tracer._lock:
                    if result == SpanExportResult.SUCCESS:
                        tracer.exported += len(spans)
                    else:
                        tracer.dropped += len(spans)
                return result

            def shutdown(self) -> None:
                exporter.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return True

        class Dropping(BatchSpanProcessor):  # counts the spans a full queue turns away
            def on_end(self, span: Any) -> None:
                queue = getattr(self._batch_processor, "_queue", None)
                if queue is not None and len(queue) >= queue.maxlen:
                    with tracer._lock:
                        tracer.dropped += 1
                super().on_end(span)

        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.processor = Dropping(Counting(), max_queue_size=4096, schedule_delay_millis=500, export_timeout_millis=3000)
        self.provider.add_span_processor(self.processor)
        self._tracer = self.provider.get_tracer("slimserve.server")
        self._propagator = TraceContextTextMapPropagator()

    def begin(self, model: str, traceparent: str | None = None) -> RequestTrace | None:
        """A trace for this request when the settings sample it, else None (the common, cheap case)."""
        if not self.settings.sample(model):
            return None
        return RequestTrace(model, traceparent, time.time_ns())

    def finish(self, trace: RequestTrace, code: str = "OK") -> None:
        """Makes the request's spans from its stamps and hands them to the processor (no I/O here)."""
        end = time.time_ns()
        context = self._propagator.extract({"traceparent": trace.parent}) if trace.parent else None
        started = trace.started or end
        attributes = {"slimserve.model": trace.model, "slimserve.variant": trace.variant, "slimserve.code": code}
        if trace.batch:
            attributes["slimserve.batch_size"] = trace.batch[0][2]
        root = self._tracer.start_span("infer", context=context, start_time=trace.received, attributes=attributes)
        from opentelemetry.trace import set_span_in_context

        inner = set_span_in_context(root)
        stages = [("receive", trace.received, started), ("route", started, trace.routed or started)]
        if trace.batch and trace.computed:
            compute_start_perf, compute_seconds, _ = trace.batch[0]
            # perf_counter -> wall clock: the offset measured now (both clocks advance alike over a request)
            offset = time.time_ns() - int(time.perf_counter() * 1e9)
            compute_start = int(compute_start_perf * 1e9) + offset
            compute_end = compute_start + int(compute_seconds * 1e9)
            queued_from = trace.routed or started
            stages.append(("queue", queued_from, max(queued_from, compute_start)))
            stages.append(("compute", max(queued_from, compute_start), max(queued_from, compute_end)))
        if trace.answered and trace.computed and trace.answered > trace.computed:
            stages.append(("shadow", trace.computed, trace.answered))
        stages.append(("respond", trace.answered or trace.computed or started, end))
        for name, begin, finish in stages:
            self._tracer.start_span(name, context=inner, start_time=begin).end(end_time=max(begin, finish))
        root.end(end_time=end)

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.processor.force_flush(int(timeout_s * 1000))

    def close(self) -> None:
        self.provider.shutdown()
