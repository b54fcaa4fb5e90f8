"""Request tracing: Triton's trace settings (level, rate, count; global and per model) and OpenTelemetry spans per request.

A sampled request carries a `RequestTrace` (stamps in nanoseconds, taken as the request passes each stage); its spans are
built only when it is answered, with the stamps as their start and end times: `receive` (the transport decoding),
`route`, `queue`, `compute`, `shadow` (handing copies to shadows, when there are any) and `respond` (encoding), children
of one `infer` span with the model, variant and batch size as attributes. They leave in batches, as OTLP/HTTP protobuf
(OpenTelemetry's trace.proto, written in its wire format), for `--trace-endpoint` on a thread of their own: an endpoint
that cannot be reached never slows or fails a request; its spans are dropped and counted (`dropped`).

A request that is not sampled costs one dictionary lookup and one comparison (`TraceSettings.sample`).
"""

from __future__ import annotations

import http.client
import logging
import os
import struct
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Mapping
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

    def stored(self, model: str = "") -> dict[str, Any] | None:
        """What to persist for the server (model ""), or a model's own settings (only the keys it set itself), in
        Triton's string form as `update` takes them; None: a model without settings of its own."""
        if not model:
            return {k: v for k, v in self.get().items() if k != "trace_mode"}
        sampler = self.models.get(model)
        if sampler is None:
            return None
        return {k: v for k, v in self.get(model).items() if k in sampler.explicit}

    def restore(self, server: Mapping[str, Any] | None, models: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Settings read back from the repository at start (server first, then each model's own); returns one line per
        stored setting that no longer parses, which is skipped (its scope keeps the value it has) rather than fatal."""
        skipped = []
        for model, changes in [("", server or {}), *models.items()]:
            for key, value in changes.items():
                try:
                    self.update({key: value}, model)
                except InvalidArgument as e:
                    skipped.append(f"{model or 'server'}: {key}: {e.message}")
        return skipped


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
            raise InvalidArgument(
                "trace level TENSORS is not supported by slimserve: its spans carry stage timestamps and the model, variant "
                "and batch size, never input or output tensor values; use TIMESTAMPS (or OFF)"
            )
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
        self.answered = 0  # the data plane answered (shadows handed their copies); 0 without shadows


def parse_traceparent(value: str | None) -> tuple[bytes, bytes] | None:
    """(trace id, parent span id) of a W3C `traceparent` header (version 00 layout), or None when absent or invalid
    (the spec's rule: an invalid header is ignored and a new trace starts)."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None
    if not any(trace_id) or not any(span_id):
        return None
    return trace_id, span_id


class Tracer:
    """Spans of sampled requests, exported over OTLP/HTTP (protobuf) in batches by one background thread.

    A finished request is one tuple appended to a bounded deque (a few microseconds on the event loop); the thread
    writes each batch as one ExportTraceServiceRequest (protobuf's wire format, `_encode`) and POSTs it on a connection
    it keeps open. A full queue or a failed export drops the spans and counts them (`dropped`); nothing waits on the
    endpoint. The thread's own CPU time is counted (`exporter_cpu_s`, on /metrics): what tracing costs off the loop.

    Not OpenTelemetry's SDK span objects and BatchSpanProcessor: on this machine they cost about 110 µs of CPU per
    request for seven spans, and their OTLP encoding as much again (bench/bench_tracing.py measures the whole path)."""

    def __init__(
        self,
        settings: TraceSettings,
        endpoint: str,
        service: str = "slimserve",
        max_queue: int = 4096,
        batch: int = 512,
        interval_s: float = 0.5,
        timeout_s: float = 2.0,
    ) -> None:
        self.settings = settings
        self.url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
        self.service = service
        self.exported = 0  # spans the endpoint took
        self.dropped = 0  # spans lost: queue full, or the endpoint failed or could not be reached
        self.exporter_cpu_s = 0.0  # CPU time the exporter thread spent encoding and sending (what tracing costs off the loop)
        self.exported_requests = 0  # traced requests the exporter thread handled (sent or dropped)
        self._queue: deque[tuple] = deque()
        self._max_queue = max_queue
        self._batch = batch
        self._interval = interval_s
        self._timeout = timeout_s
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._connection: http.client.HTTPConnection | None = None  # kept alive between exports (the exporter thread's)
        self._path = urllib.parse.urlsplit(self.url).path or "/v1/traces"
        self._headers = {"Content-Type": "application/x-protobuf"}
        self._attributes: dict[tuple, bytes] = {}  # the infer span's attributes, encoded, by (model, variant, code, batch size)
        self._thread = threading.Thread(target=self._run, name="trace-exporter", daemon=True)
        self._thread.start()

    def begin(self, model: str, traceparent: str | None = None) -> RequestTrace | None:
        """A trace for this request when the settings sample it, else None (the common, cheap case)."""
        if not self.settings.sample(model):
            return None
        return RequestTrace(model, traceparent, time.time_ns())

    def finish(self, trace: RequestTrace, code: str = "OK") -> None:
        """Queues the request's spans (as one tuple: made into messages on the exporter thread)."""
        if len(self._queue) >= self._max_queue:
            self.dropped += 1 + len(STAGES)
            return
        end = time.time_ns()
        batch = trace.batch[0] if trace.batch else None
        self._queue.append((trace, code, end, batch))
        if len(self._queue) >= self._batch:
            self._wake.set()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Waits until everything queued so far was exported (or dropped); False if that took longer than `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._queue and self._idle.is_set():
                return True
            self._wake.set()
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)

    # ---------------------------------------------------------------- the exporter thread

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._wake.clear()
            while self._queue:
                self._idle.clear()
                taken = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
                started = time.thread_time()
                try:
                    body, spans = self._encode(taken)
                    self._post(body, spans)
                except Exception:  # a bug here must not stop tracing, and never reaches a request
                    log.exception("trace export failed")
                    self.dropped += len(taken) * (1 + len(STAGES))
                self.exporter_cpu_s += time.thread_time() - started
                self.exported_requests += len(taken)
            self._idle.set()
        self._disconnect()

    def _post(self, body: bytes, spans: int) -> None:
        """POSTs one export on a kept-alive connection (urllib's fresh connection, resolver call and handler chain per
        export cost more than encoding the batch did); a connection the endpoint closed in between is retried once on a
        new one. Failed: the spans are dropped and counted."""
        ok = False
        for attempt in range(2):
            reused = self._connection is not None
            try:
                if self._connection is None:
                    self._connection = self._connect()
                self._connection.request("POST", self._path, body, self._headers)
                answer = self._connection.getresponse()
                answer.read()
                ok = 200 <= answer.status < 300
                if not ok:
                    log.debug("trace endpoint %s answered HTTP %d", self.url, answer.status)
                if answer.will_close:
                    self._disconnect()
                break
            except (OSError, http.client.HTTPException, ValueError) as e:  # refused, unreachable, timed out, closed
                self._disconnect()
                if not reused or attempt:
                    log.debug("trace endpoint %s: %s", self.url, e)
                    break
        if ok:
            self.exported += spans
        else:
            self.dropped += spans

    def _connect(self) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(self.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return kind(parts.hostname or "", parts.port, timeout=self._timeout)

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _encode(self, taken: list[tuple]) -> tuple[bytes, int]:
        """One ExportTraceServiceRequest, written in protobuf's wire format directly (OpenTelemetry's trace.proto field
        numbers, in their order: what its own messages serialize to, as tests/server/test_tracing.py checks by parsing
        it back with them). The ids of a whole batch come from one os.urandom call; a request's stage spans are one
        struct.pack of a layout made once per set of stages; the infer span's attributes are encoded once per model,
        variant, outcome and batch size: about a third of the time of the writer it replaced, side by side
        (`bench/bench_trace_encode.py` compares it with OpenTelemetry's own messages)."""
        offset = time.time_ns() - time.perf_counter_ns()  # perf_counter -> wall clock (both advance alike over a request)
        ids = os.urandom(_ID_BYTES * len(taken))
        attributes_of = self._attributes
        pack = _FIXED.pack
        out = []
        k = spans = 0
        for trace, code, end, batch in taken:
            parent = parse_traceparent(trace.parent) if trace.parent else None
            if parent is None:
                trace_id, parent_part = ids[k : k + 16], b""
            else:
                trace_id, parent_part = parent[0], b"\x22\x08" + parent[1]
            root_id = ids[k + 16 : k + 24]
            k += 24
            key = (trace.model, trace.variant, code, batch[2] if batch is not None else None)
            attributes = attributes_of.get(key)
            if attributes is None:
                if len(attributes_of) >= 1024:  # bounded: models x variants x outcomes x batch sizes seen lately
                    attributes_of.clear()
                attributes = attributes_of[key] = _root_attributes(*key)
            root = (
                b"\x0a\x10" + trace_id + b"\x12\x08" + root_id + parent_part + _INFER + pack(0x39, trace.received, 0x41, end) + attributes
            )
            out.append(b"\x12" + _varint(len(root)) + root)
            layout, times = _stage_times(trace, end, batch, offset)
            packer, constants = _LAYOUTS[layout]
            args: list = []
            j = 0
            for head, name_kind in constants:
                args += (head, trace_id, b"\x12\x08", ids[k : k + 8], b"\x22\x08", root_id, name_kind, times[j], 0x41, times[j + 1])
                k += 8
                j += 2
            k += 8 * (len(STAGES) - len(constants))  # each request owns _ID_BYTES of the batch's ids
            out.append(packer.pack(*args))
            spans += 1 + len(constants)
        scope = _SCOPE + b"".join(out)  # ScopeSpans: the scope, then every span
        resource_spans = self._resource + b"\x12" + _varint(len(scope)) + scope
        return b"\x0a" + _varint(len(resource_spans)) + resource_spans, spans

    @property
    def _resource(self) -> bytes:
        """ResourceSpans.resource: service.name."""
        key_value = _key_value(b"service.name", self.service)
        resource = b"\x0a" + _varint(len(key_value)) + key_value  # Resource.attributes
        return b"\x0a" + _varint(len(resource)) + resource


_FIXED = struct.Struct("<BQBQ")  # start_time_unix_nano (field 7) and end_time_unix_nano (field 8), fixed64
_ID_BYTES = 16 + 8 + 8 * len(STAGES)  # a request's random ids: trace id, the infer span's id, one per stage span


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _text(field: int, value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return bytes((field << 3 | 2,)) + _varint(len(data)) + data


def _key_value(key: bytes, value: str) -> bytes:
    """A KeyValue of a string AnyValue."""
    any_value = _text(1, value)
    return _text(1, key) + b"\x12" + _varint(len(any_value)) + any_value


def _attribute(key: bytes, value: str) -> bytes:
    """Span.attributes (field 9): one KeyValue."""
    key_value = _key_value(key, value)
    return b"\x4a" + _varint(len(key_value)) + key_value


def _root_attributes(model: str, variant: str, code: str, batch_size: int | None) -> bytes:
    """The infer span's attributes: model, variant, outcome, and the batch size when the request reached a batch."""
    attributes = _attribute(b"slimserve.model", model) + _attribute(b"slimserve.variant", variant) + _attribute(b"slimserve.code", code)
    if batch_size is not None:
        value = b"\x18" + _varint(batch_size & 0xFFFFFFFFFFFFFFFF)  # AnyValue.int_value
        key_value = b"\x0a\x14slimserve.batch_size\x12" + _varint(len(value)) + value
        attributes += b"\x4a" + _varint(len(key_value)) + key_value
    return attributes


_INFER = _text(5, "infer") + b"\x30\x02"  # name, kind SPAN_KIND_SERVER
_SCOPE = b"\x0a" + _varint(len(_text(1, "slimserve.server"))) + _text(1, "slimserve.server")  # ScopeSpans.scope


def _stage_layout(names: tuple[str, ...]) -> tuple[struct.Struct, list[tuple[bytes, bytes]]]:
    """The stage spans of one request, each ScopeSpans.spans (field 2) holding a Span: trace_id (1), span_id (2),
    parent_span_id (4), name (5), kind (6, INTERNAL), start (7) and end (8) times; as one struct layout with the
    constant pieces (each span's tag and length, its name and kind) to pass along with the ids and times."""
    fields, constants = ["<"], []
    for name in names:
        name_kind = _text(5, name) + b"\x30\x01\x39"  # name, kind, then start_time_unix_nano's tag
        size = 2 + 16 + 2 + 8 + 2 + 8 + len(name_kind) + 8 + 1 + 8
        constants.append((b"\x12" + _varint(size) + b"\x0a\x10", name_kind))
        fields.append(f"{len(constants[-1][0])}s16s2s8s2s8s{len(name_kind)}sQBQ")
    return struct.Struct("".join(fields)), constants


# The sets of stages a request can go through (queue and compute when it reached a batcher, shadow with shadows).
_BASE, _BATCHED, _SHADOWED, _BOTH = (
    ("receive", "route", "respond"),
    ("receive", "route", "queue", "compute", "respond"),
    ("receive", "route", "shadow", "respond"),
    ("receive", "route", "queue", "compute", "shadow", "respond"),
)
_LAYOUTS = {names: _stage_layout(names) for names in (_BASE, _BATCHED, _SHADOWED, _BOTH)}


def _stage_times(trace: RequestTrace, end: int, batch: tuple[float, float, int] | None, offset: int) -> tuple[tuple[str, ...], list[int]]:
    """The stages a request went through (one of the four sets above) and their (start, end) times, flat, from its
    stamps; an end is never before its start."""
    started = trace.started or end
    routed = trace.routed or started
    computed = trace.computed
    answered = trace.answered
    respond_from = answered or computed or started
    if batch is not None and computed:
        compute_start = min(max(routed, int(batch[0] * 1e9) + offset), computed)
        compute_end = min(computed, compute_start + int(batch[1] * 1e9))
        times = [
            trace.received,
            max(trace.received, started),
            started,
            max(started, routed),
            routed,
            compute_start,
            compute_start,
            compute_end,
        ]
        if answered:
            return _BOTH, [*times, computed, max(computed, answered), respond_from, max(respond_from, end)]
        return _BATCHED, [*times, respond_from, max(respond_from, end)]
    times = [trace.received, max(trace.received, started), started, max(started, routed)]
    if answered:
        return _SHADOWED, [*times, computed, max(computed, answered), respond_from, max(respond_from, end)]
    return _BASE, [*times, respond_from, max(respond_from, end)]


def _stages(trace: RequestTrace, end: int, batch: tuple[float, float, int] | None, offset: int) -> list[tuple[str, int, int]]:
    """(name, start, end) of the stages a request went through, from its stamps (what `_encode` writes)."""
    names, times = _stage_times(trace, end, batch, offset)
    return [(name, times[2 * i], times[2 * i + 1]) for i, name in enumerate(names)]


class TraceCollector:
    """The tracer's span counts for /metrics: `slimserve_trace_spans_exported_total` and `..._dropped_total`."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("slimserve_trace_spans_exported", "Spans the trace endpoint took.", value=self.tracer.exported)
        yield CounterMetricFamily(
            "slimserve_trace_spans_dropped",
            "Spans dropped: the export queue was full, or the trace endpoint failed or could not be reached.",
            value=self.tracer.dropped,
        )
        yield CounterMetricFamily(
            "slimserve_trace_exporter_cpu_seconds",
            "CPU time of the trace exporter thread (encoding spans and sending them), off the requests' path.",
            value=self.tracer.exporter_cpu_s,
        )
        yield CounterMetricFamily(
            "slimserve_trace_exported_requests",
            "Traced requests the trace exporter handled (their spans sent or dropped).",
            value=self.tracer.exported_requests,
        )
