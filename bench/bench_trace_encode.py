"""What encoding a batch of traced requests costs on the exporter thread: slimserve's wire-format writer against the
same request built from OpenTelemetry's protobuf messages (the way `Tracer._encode` worked before).

    python -m bench.bench_trace_encode [--rounds 7] [--batch 512]

Each round times both on the same batch (a request with a batched compute stage: six spans), in turn, and checks that
both parse to the same spans (ids aside); the table gives the medians in µs per traced request.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from slimserve.server.telemetry.tracing import RequestTrace, Tracer, TraceSettings, _stages


def with_messages(tracer: Tracer, taken: list[tuple]) -> bytes:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    request = ExportTraceServiceRequest()
    resource = request.resource_spans.add()
    resource.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=tracer.service)))
    scope = resource.scope_spans.add()
    scope.scope.name = "slimserve.server"
    bits = random.getrandbits
    offset = time.time_ns() - time.perf_counter_ns()
    for trace, code, end, batch in taken:
        trace_id, root_id = bits(128).to_bytes(16, "big"), bits(64).to_bytes(8, "big")
        attributes = [
            KeyValue(key="slimserve.model", value=AnyValue(string_value=trace.model)),
            KeyValue(key="slimserve.variant", value=AnyValue(string_value=trace.variant)),
            KeyValue(key="slimserve.code", value=AnyValue(string_value=code)),
            KeyValue(key="slimserve.batch_size", value=AnyValue(int_value=batch[2])),
        ]
        scope.spans.append(
            Span(
                trace_id=trace_id,
                span_id=root_id,
                name="infer",
                kind=Span.SpanKind.SPAN_KIND_SERVER,
                start_time_unix_nano=trace.received,
                end_time_unix_nano=end,
                attributes=attributes,
            )
        )
        for name, begin, finish in _stages(trace, end, batch, offset):
            scope.spans.append(
                Span(
                    trace_id=trace_id,
                    span_id=bits(64).to_bytes(8, "big"),
                    parent_span_id=root_id,
                    name=name,
                    kind=Span.SpanKind.SPAN_KIND_INTERNAL,
                    start_time_unix_nano=begin,
                    end_time_unix_nano=max(begin, finish),
                )
            )
    return request.SerializeToString()


def shape(body: bytes) -> list[tuple]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    # queue / compute times come from perf_counter, shifted to the wall clock per batch: they may differ by a few ns
    return [
        (s.name, s.kind, len(s.attributes), *((s.start_time_unix_nano, s.end_time_unix_nano) if s.name not in ("queue", "compute") else ()))
        for s in spans
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    tracer = Tracer(TraceSettings("TIMESTAMPS", 1), "http://127.0.0.1:9")
    now = time.time_ns()
    taken = []
    for i in range(args.batch):
        trace = RequestTrace("digits", None, now + i)
        trace.started, trace.routed, trace.computed, trace.variant = now + i + 20_000, now + i + 25_000, now + i + 90_000, "baseline"
        taken.append((trace, "OK", now + i + 110_000, (time.perf_counter(), 0.00004, 4)))
    ours, _ = tracer._encode(taken)
    assert shape(ours) == shape(with_messages(tracer, taken)), "the two encodings disagree"
    times: dict[str, list[float]] = {"wire format (slimserve)": [], "protobuf messages": []}
    for _ in range(args.rounds):
        for name, encode in (
            ("wire format (slimserve)", lambda: tracer._encode(taken)),
            ("protobuf messages", lambda: with_messages(tracer, taken)),
        ):
            start = time.perf_counter()
            encode()
            times[name].append((time.perf_counter() - start) / args.batch * 1e6)
    tracer.close(0.1)
    medians = {name: round(statistics.median(t), 1) for name, t in times.items()}
    print(f"encoding {args.batch} traced requests (6 spans each), {args.rounds} rounds (medians)")
    print(f"{'encoder':<26}{'µs per request':>16}")
    for name, value in medians.items():
        print(f"{name:<26}{value:>16}")
    if args.json:
        print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
