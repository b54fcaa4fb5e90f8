"""Overload: a full variant queue answers RESOURCE_EXHAUSTED at once; a request whose deadline passed is never run."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from slimserve.client import codec
from slimserve.client.client import SlimServeClient
from slimserve.protos import inference_pb2 as pb
from slimserve.protos import inference_pb2_grpc as pb_grpc
from tests.helpers import wait_until
from tests.server.test_http import binary_request, call, post_json
from tests.server.test_shutdown import slow_matmul_onnx

BIG = [("grpc.max_receive_message_length", 64 << 20)]


WIDTH = 512
LONG = 2048  # rows of a call that keeps the variant busy for a while (0.1-0.5 s on 2 cores)


def request(rows: int) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="slow")
    codec.fill_input(r, "x", np.ones((rows, WIDTH), np.float32))
    return r


def register_slow(server, tmp_path) -> None:
    """Registers the slow model and waits for its background evaluation, which would compete for the cores."""
    with SlimServeClient(server.address) as c:
        c.register("slow", slow_matmul_onnx(tmp_path / "slow.onnx", n=WIDTH))
        wait_until(lambda: c.model("slow")["variants"][0]["latency_p50_ms"] is not None, "the baseline's evaluation", 120)


def batcher_of(server):
    return server.server.dataplane.models["slow"].variants["baseline"].batcher


def stats_of(server):
    return server.server.dataplane.models["slow"].variants["baseline"].stats


@pytest.fixture
def slow_server(server_factory, tmp_path):
    """One request at a time per variant (batches of 1) and room for two waiting: a small, slow queue."""
    server = server_factory(max_queue_size=2, max_batch_size=1, max_concurrent_calls=1)
    register_slow(server, tmp_path)
    return server


def test_a_full_queue_answers_resource_exhausted_at_once_and_the_queued_requests_still_finish(slow_server):
    with grpc.insecure_channel(slow_server.address, options=BIG) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        start = time.perf_counter()
        infer(request(LONG), timeout=60)
        one_call = time.perf_counter() - start
        running = infer.future(request(LONG), timeout=60)
        wait_until(lambda: batcher_of(slow_server)._inflight == 1, "the long call to compute", interval=0.002)  # the queue is empty
        queued = [infer.future(request(LONG), timeout=60) for _ in range(2)]
        wait_until(lambda: batcher_of(slow_server).queued == 2, "two queued requests", interval=0.002)
        assert batcher_of(slow_server)._inflight == 1  # the concurrency limit: a free compute thread, yet they wait
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            infer(request(1), timeout=60)
        refused_after = time.perf_counter() - start
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "variant 'baseline' of model 'slow': queue full (2 requests waiting)" in e.value.details()
        assert refused_after < one_call / 2, (refused_after, one_call)  # at once, not after waiting its turn
        for future in (running, *queued):
            assert future.result(60).outputs[0].shape == [LONG, WIDTH]
        infer(request(1), timeout=60)  # room again once the queue drained
    assert (
        slow_server.metrics.registry.get_sample_value(
            "slimserve_requests_total", {"model": "slow", "variant": "baseline", "node_type": "cpu", "code": "RESOURCE_EXHAUSTED"}
        )
        == 1
    )
    full = slow_server.metrics.registry.get_sample_value(
        "slimserve_queue_dropped_total", {"model": "slow", "variant": "baseline", "node_type": "cpu", "reason": "full"}
    )
    assert full == 1 and stats_of(slow_server).shed == 1  # shed, as the SLO loop reads it


def test_requests_whose_deadline_passes_while_queued_are_never_run(server_factory, tmp_path):
    server = server_factory(max_batch_size=1, max_concurrent_calls=1)  # one call runs, the rest queue behind it
    register_slow(server, tmp_path)
    with grpc.insecure_channel(server.address, options=BIG) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        # Warm with a long call: a 1-row warm-up that happened to be slow (a busy machine) made the likely cost of a
        # long call (its cost per sample x 2048) pass the 60 s deadline, and the timing call was dropped.
        infer(request(LONG), timeout=60)
        start = time.perf_counter()
        infer(request(LONG), timeout=60)
        one_call = time.perf_counter() - start
        before = stats_of(server).samples
        running = infer.future(request(LONG), timeout=60)
        wait_until(lambda: batcher_of(server)._inflight == 1, "the long call to compute", interval=0.002)
        late = [infer.future(request(7), timeout=min(0.05, one_call / 4)) for _ in range(5)]
        codes = []
        for future in late:
            with pytest.raises(grpc.RpcError) as e:
                future.result(60)
            codes.append(e.value.code())
        # The running call's measured cost already ends past their deadlines: refused on arrival (RESOURCE_EXHAUSTED);
        # one admitted while that call overran its typical cost is dropped from the queue at its deadline instead.
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        assert running.result(60).outputs[0].shape == [LONG, WIDTH]
        wait_until(lambda: batcher_of(server).queued == 0, "the queue to drain", interval=0.002)
        time.sleep(0.2)  # had a late request been kept, it would run now, right after the long one
        infer(request(3), timeout=60)
        # gRPC's done callback reported when the answers with a deadline left: the variant's time after compute
        wait_until(lambda: len(batcher_of(server).answer_time) >= 1, "the answers' time after compute", interval=0.002)
    # Executed samples: the long call and the last one; none of the 5 x 7 whose callers gave up.
    assert stats_of(server).samples - before == LONG + 3
    batch_size = server.metrics.registry.get_sample_value(
        "slimserve_batch_size_sum", {"model": "slow", "variant": "baseline", "node_type": "cpu"}
    )
    assert batch_size == LONG + LONG + LONG + 3  # warm-up, timing call, long call, last call
    dropped = {
        reason: server.metrics.registry.get_sample_value(
            "slimserve_queue_dropped_total", {"model": "slow", "variant": "baseline", "node_type": "cpu", "reason": reason}
        )
        for reason in ("deadline", "refused")
    }
    assert dropped["deadline"] + dropped["refused"] == 5  # refused or dropped before compute, and counted
    assert dropped["refused"] == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert stats_of(server).shed == 5  # what the SLO loop reads (Arm.shed): shed requests break an objective


def test_a_rest_timeout_parameter_is_a_deadline_in_the_queue_an_answer_after_it_a_504_and_a_bad_one_is_refused(server_factory, tmp_path):
    server = server_factory(max_batch_size=1, max_concurrent_calls=1, http_port=0)
    register_slow(server, tmp_path)

    def rest(rows: int, parameters: dict) -> tuple[int, dict]:
        body = {
            "inputs": [{"name": "x", "shape": [rows, WIDTH], "datatype": "FP32", "data": [1.0] * (rows * WIDTH)}],
            "parameters": parameters,
        }
        return post_json(server.http_address, "/v2/models/slow/infer", body)

    # First, nothing measured yet, so nothing can predict that a long call ends past its 20 ms: it is computed, but the
    # answer is not sent after the caller's timeout: 504, counted reason='late' (shed, as the SLO loop reads it).
    x = np.ones((LONG, WIDTH), np.float32)  # binary, so that decoding the body does not use up the 20 ms
    header = {
        "inputs": [{"name": "x", "shape": [LONG, WIDTH], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"timeout": 20_000},
    }
    before = stats_of(server).samples
    status, _, text = call(server.http_address, "POST", "/v2/models/slow/infer", *binary_request(header, x.tobytes()))
    answer = json.loads(text)
    assert status == 504 and "computed, but its answer was ready" in answer["error"] and "'timeout'" in answer["error"], answer
    assert stats_of(server).samples - before == LONG  # computed (the call could not be foreseen), not answered late
    late = server.metrics.registry.get_sample_value(
        "slimserve_queue_dropped_total", {"model": "slow", "variant": "baseline", "node_type": "cpu", "reason": "late"}
    )
    assert late == 1 and stats_of(server).shed == 1

    with grpc.insecure_channel(server.address, options=BIG) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        infer(request(1), timeout=60)
        infer(request(LONG), timeout=60)  # long calls measured: the next one goes to the compute pool, not inline
        before = stats_of(server).samples
        running = infer.future(request(LONG), timeout=60)
        wait_until(lambda: batcher_of(server)._inflight == 1, "the long call to compute", interval=0.002)
        status, answer = rest(3, {"timeout": 20_000})  # 20 ms, behind a call of 0.1-0.5 s
        # Refused on arrival (429) since the running call's measured cost ends past it; or, where that call already ran
        # past its typical cost, taken into the queue and dropped there at its deadline (504).
        assert (status == 429 and "refused rather than queued past it" in answer["error"]) or (
            status == 504 and "deadline" in answer["error"] and ("not computed" in answer["error"] or "before compute" in answer["error"])
        ), (status, answer)
        assert running.result(60).outputs[0].shape == [LONG, WIDTH]
    assert stats_of(server).samples - before == LONG  # the late one never ran
    status, answer = rest(1, {"timeout": "soon"})
    assert status == 400 and "parameter 'timeout'" in answer["error"] and "microseconds" in answer["error"]
    assert rest(1, {"timeout": 30_000_000})[0] == 200  # in time: answered
    # Answers with a deadline report when they left (REST: encoded; gRPC: its done callback): the time after compute
    assert len(batcher_of(server).answer_time) >= 1


def test_max_concurrent_calls_lets_a_variant_run_calls_side_by_side(server_factory, digits):
    server = server_factory(max_concurrent_calls=2)
    with SlimServeClient(server.address) as c:
        c.register("digits", digits.onnx)
        batcher = server.server.dataplane.models["digits"].variants["baseline"].batcher
        assert batcher.max_concurrency == 2
        assert c.infer("digits", {"x": digits.x_test[:3]})[1]["logits"].shape == (3, 10)
