"""Request tracing: Triton's trace settings, and spans exported over OTLP/HTTP to a real receiver started here, decoded.

The receiver is a plain HTTP server on a free loopback port that answers OTLP/HTTP's `/v1/traces` and decodes each body
with OpenTelemetry's own protobuf messages (ExportTraceServiceRequest)."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from slimserve.client import codec
from slimserve.client.client import SlimServeClient
from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc
from slimserve.server.errors import InvalidArgument
from slimserve.server.telemetry.tracing import TraceSettings
from tests.helpers import free_port

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver: every span it was sent, as (name, trace id hex, parent span id hex, attributes)."""

    def __init__(self, keep_alive: bool = False) -> None:
        self.spans: list[tuple[str, str, str, dict]] = []
        self.connections = 0
        self.hang_up = False  # keep-alive: close the connection after the next answer without saying so (an idle timeout)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                receiver.connections += 1

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            attributes = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                            receiver.spans.append((span.name, span.trace_id.hex(), span.parent_span_id.hex(), attributes))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                if receiver.hang_up:
                    receiver.hang_up, self.close_connection = False, True

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def infer_request(digits, model: str = "digits") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    codec.fill_input(request, "x", digits.x_test[:1])
    return request


def test_each_traced_request_sends_its_stages_as_spans_that_continue_the_callers_trace(server_factory, digits, receiver):
    server = server_factory(trace_endpoint=receiver.endpoint, trace_rate=1)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
    traceparent = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request(digits), metadata=[("traceparent", traceparent)], timeout=30)
        stub.ModelInfer(infer_request(digits), timeout=30)  # no caller's trace: a trace of its own
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": digits.x_test[0].ravel().tolist()}]})
    rest_parent = f"00-{'ab' * 16}-{PARENT_SPAN}-01"
    rest = urllib.request.Request(
        f"http://{server.http_address}/v2/models/digits/infer",
        body.encode(),
        {"traceparent": rest_parent, "Content-Type": "application/json"},
    )
    assert json.loads(urllib.request.urlopen(rest, timeout=30).read())["outputs"][0]["name"] == "logits"
    assert server.server.tracer.flush(10)
    roots = [s for s in receiver.spans if s[0] == "infer"]
    assert len(roots) == 3, receiver.spans
    grpc_root = next(s for s in roots if s[1] == PARENT_TRACE)
    assert grpc_root[2] == PARENT_SPAN  # the caller's span is the parent of ours
    assert grpc_root[3]["slimserve.model"] == "digits" and grpc_root[3]["slimserve.variant"] == "baseline"
    assert grpc_root[3]["slimserve.batch_size"] == 1 and grpc_root[3]["slimserve.code"] == "OK"
    stages = sorted(s[0] for s in receiver.spans if s[1] == PARENT_TRACE and s[0] != "infer")
    assert stages == ["compute", "queue", "receive", "respond", "route"]
    assert any(s[1] == "ab" * 16 for s in roots)  # the REST caller's traceparent header
    assert len({s[1] for s in roots}) == 3
    assert server.server.tracer.dropped == 0
    sample = server.server.metrics.registry.get_sample_value
    assert sample("slimserve_trace_exported_requests_total") == server.server.tracer.exported_requests == 3
    assert sample("slimserve_trace_exporter_cpu_seconds_total") == server.server.tracer.exporter_cpu_s > 0


def test_the_exporter_keeps_one_connection_and_reconnects_when_the_endpoint_closed_it():
    from slimserve.server.telemetry.tracing import Tracer

    receiver = Receiver(keep_alive=True)
    tracer = Tracer(TraceSettings("TIMESTAMPS", 1), receiver.endpoint)
    try:

        def export() -> None:
            tracer.finish(tracer.begin("m"))
            assert tracer.flush(10)

        for _ in range(3):
            export()
        assert receiver.connections == 1 and tracer.exported == 3 * 4  # three exports on one connection (infer + 3 stages each)
        receiver.hang_up = True
        export()
        export()  # the kept connection is gone: sent again on a new one, nothing lost
        assert receiver.connections == 2 and tracer.exported == 5 * 4 and tracer.dropped == 0
        assert sum(1 for s in receiver.spans if s[0] == "infer") == 5
    finally:
        tracer.close(1)
        receiver.close()


def test_trace_settings_pick_which_requests_are_traced(server_factory, digits, receiver):
    server = server_factory(trace_endpoint=receiver.endpoint, trace_rate=2)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
        for _ in range(4):
            c.infer("digits", {"x": digits.x_test[:1]})
        server.server.control.update_trace_settings({"trace_level": ["OFF"]}, "digits")
        for _ in range(4):
            c.infer("digits", {"x": digits.x_test[:1]})
    assert server.server.tracer.flush(10)
    assert sum(1 for s in receiver.spans if s[0] == "infer") == 2  # one in two, then none for this model


def test_an_unreachable_endpoint_drops_and_counts_spans_and_never_slows_a_request(server_factory, digits):
    server = server_factory(trace_endpoint=f"http://127.0.0.1:{free_port()}", trace_rate=1)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
        c.infer("digits", {"x": digits.x_test[:1]})
        started = time.perf_counter()
        for _ in range(50):
            assert c.infer("digits", {"x": digits.x_test[:1]})[1]["logits"].shape == (1, 10)
        seconds = time.perf_counter() - started
    assert seconds < 10  # the exporter's retries (2 s timeout) happen on its own thread, never in a request
    server.server.tracer.flush(10)
    deadline = time.monotonic() + 15
    while server.server.tracer.dropped < 51 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.server.tracer.dropped >= 51 * 6 and server.server.tracer.exported == 0
    dropped = server.server.metrics.registry.get_sample_value("slimserve_trace_spans_dropped_total")
    assert dropped == server.server.tracer.dropped


def test_trace_settings_rules():
    settings = TraceSettings("TIMESTAMPS", rate=3, count=2)
    assert [settings.sample("m") for _ in range(9)] == [False, False, True, False, False, True, False, False, False]  # count 2
    assert settings.get() == {"trace_level": ["TIMESTAMPS"], "trace_rate": "3", "trace_count": "0", "trace_mode": "opentelemetry"}
    own = settings.update({"trace_count": "-1", "trace_rate": 1}, "m")
    assert own["trace_rate"] == "1" and own["trace_count"] == "-1" and settings.sample("m") and not settings.sample("other")
    settings.update({"trace_rate": "10"})  # the server's rate changes; the model keeps its own
    assert settings.get("m")["trace_rate"] == "1"
    assert settings.update({"trace_rate": None, "trace_count": None}, "m") == settings.get()
    for changes, message in (
        ({"trace_rate": "0"}, "trace_rate must be an integer >= 1"),
        ({"trace_count": "x"}, "trace_count must be an integer >= -1"),
        ({"trace_level": ["LOUD"]}, "unknown trace level 'LOUD'"),
        ({"trace_file": "/tmp/t.json"}, "trace_file does not apply"),
        ({"trace_colour": "1"}, "unknown trace setting 'trace_colour'"),
        ({"trace_rate": None}, "cannot be cleared"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            settings.update(changes)
    assert settings.get()["trace_rate"] == "10"  # nothing changed by a refused update


def test_no_endpoint_means_no_tracer_and_requests_carry_no_trace(server_factory, digits):
    server = server_factory()
    assert server.server.tracer is None and server.server.dataplane.tracer is None
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
        assert np.asarray(c.infer("digits", {"x": digits.x_test[:1]})[1]["logits"]).shape == (1, 10)


def test_streamed_requests_are_traced_too(server_factory, digits, receiver):
    server = server_factory(trace_endpoint=receiver.endpoint, trace_rate=1)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = list(stub.ModelStreamInfer(iter([infer_request(digits), infer_request(digits)]), timeout=30))
    assert len(answers) == 2 and not any(a.error_message for a in answers)
    assert server.server.tracer.flush(10)
    assert sum(1 for s in receiver.spans if s[0] == "infer") == 2


def test_trace_settings_outlive_a_restart_for_the_server_and_each_model(tmp_path, digits, receiver):
    from tests.conftest import ServerHandle

    repository = tmp_path / "repository"
    server = ServerHandle(repository, trace_endpoint=receiver.endpoint, trace_rate=1)
    try:
        with SlimServeClient(server.address) as c:
            c.register("digits", digits.onnx)
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = pb.TraceSettingRequest()
            request.settings["trace_rate"].value.append("7")
            stub.TraceSetting(request, timeout=10)  # the server's
            request = pb.TraceSettingRequest(model_name="digits")
            request.settings["trace_level"].value.append("OFF")
            stub.TraceSetting(request, timeout=10)  # the model's own
    finally:
        server.stop()
    again = ServerHandle(repository, trace_endpoint=receiver.endpoint, trace_rate=1)
    try:
        traces = again.server.control
        assert traces.trace_settings()["trace_rate"] == "7" and traces.trace_settings()["trace_level"] == ["TIMESTAMPS"]
        assert traces.trace_settings("digits")["trace_level"] == ["OFF"] and traces.trace_settings("digits")["trace_rate"] == "7"
        traces.update_trace_settings({"trace_level": None}, "digits")  # back to the server's: nothing of its own stored
        assert again.server.repository.trace_settings("digits") is None
    finally:
        again.stop()


def test_tensors_level_is_refused_with_what_slimserve_records_instead():
    with pytest.raises(InvalidArgument, match="TENSORS is not supported by slimserve: its spans carry stage timestamps") as raised:
        TraceSettings().update({"trace_level": ["TIMESTAMPS", "TENSORS"]})
    assert "use TIMESTAMPS" in raised.value.message


def test_spans_written_in_wire_format_parse_as_opentelemetrys_messages():
    from slimserve.server.telemetry.tracing import RequestTrace, Tracer

    tracer = Tracer(TraceSettings("TIMESTAMPS", 1), "http://127.0.0.1:9", service="svc")
    try:
        trace = RequestTrace("mödel", f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", 1_000_000)
        trace.started, trace.routed, trace.computed, trace.answered, trace.variant = 1_001_000, 1_002_000, 1_050_000, 1_060_000, "v2"
        body, count = tracer._encode([(trace, "OK", 1_070_000, (time.perf_counter(), 0.00001, 300))])
    finally:
        tracer.close(0.1)
    request = ExportTraceServiceRequest.FromString(body)
    (resource,) = request.resource_spans
    assert [(a.key, a.value.string_value) for a in resource.resource.attributes] == [("service.name", "svc")]
    (scope,) = resource.scope_spans
    assert scope.scope.name == "slimserve.server" and count == len(scope.spans) == 7
    root, *stages = scope.spans
    assert root.name == "infer" and root.kind == 2 and root.trace_id.hex() == PARENT_TRACE and root.parent_span_id.hex() == PARENT_SPAN
    assert (root.start_time_unix_nano, root.end_time_unix_nano) == (1_000_000, 1_070_000)
    attributes = {a.key: a.value.string_value or a.value.int_value for a in root.attributes}
    assert attributes == {"slimserve.model": "mödel", "slimserve.variant": "v2", "slimserve.code": "OK", "slimserve.batch_size": 300}
    assert [s.name for s in stages] == ["receive", "route", "queue", "compute", "shadow", "respond"]
    assert all(s.kind == 1 and s.trace_id == root.trace_id and s.parent_span_id == root.span_id for s in stages)
    assert len({s.span_id for s in scope.spans}) == 7 and all(s.start_time_unix_nano <= s.end_time_unix_nano for s in stages)
    assert (stages[0].start_time_unix_nano, stages[0].end_time_unix_nano) == (1_000_000, 1_001_000)


@pytest.mark.parametrize(
    ("batched", "shadowed", "names"),
    [
        (False, False, ["receive", "route", "respond"]),
        (True, False, ["receive", "route", "queue", "compute", "respond"]),
        (False, True, ["receive", "route", "shadow", "respond"]),
    ],
)
def test_each_set_of_stages_encodes_its_own_spans_with_their_times(batched, shadowed, names):
    from slimserve.server.telemetry.tracing import RequestTrace, Tracer

    tracer = Tracer(TraceSettings("TIMESTAMPS", 1), "http://127.0.0.1:9")
    try:
        traces = []
        for i in range(3):  # several requests in one batch: each keeps its own ids
            trace = RequestTrace("m", None, 1_000_000 + i)
            trace.started, trace.routed, trace.computed = 1_001_000, 1_002_000, 1_050_000
            trace.answered = 1_060_000 if shadowed else 0
            batch = (time.perf_counter(), 0.00001, 2) if batched else None
            traces.append((trace, "CANCELLED", 1_070_000, batch))
        body, count = tracer._encode(traces)
    finally:
        tracer.close(0.1)
    spans = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    assert count == len(spans) == 3 * (1 + len(names)) and len({s.span_id for s in spans}) == count
    assert len({s.trace_id for s in spans}) == 3
    root, *stages = spans[: 1 + len(names)]
    assert [s.name for s in stages] == names and all(s.parent_span_id == root.span_id for s in stages)
    times = {s.name: (s.start_time_unix_nano, s.end_time_unix_nano) for s in stages}
    assert times["receive"] == (1_000_000, 1_001_000) and times["route"] == (1_001_000, 1_002_000)
    assert times["respond"] == ((1_060_000 if shadowed else 1_050_000), 1_070_000)
    attributes = {a.key: a.value.string_value or a.value.int_value for a in root.attributes}
    assert attributes["slimserve.code"] == "CANCELLED" and attributes.get("slimserve.batch_size") == (2 if batched else None)
