"""Live A/B through the server: weighted split, sticky callers, pinning, shadows, promote/rollback, feedback, compare.

Variants are added straight into the repository (a copy of the baseline, and a 'wrong' one whose
classes are permuted) so that these tests exercise routing, not the optimizer.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from slimserve.client.cli import app
from slimserve.client.client import SlimServeClient, SlimServeClientError


def permuted_classes(source: Path, target: Path) -> Path:
    """The digits CNN with its last layer's rows rolled by one: it answers class (c + 1) % 10 where the baseline says c."""
    model = onnx.load(str(source))
    last = [t for t in model.graph.initializer if numpy_helper.to_array(t).shape[:1] == (10,)]
    for tensor in last:
        values = np.roll(numpy_helper.to_array(tensor), 1, axis=0)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(target))
    return target


@pytest.fixture
def ab(server, client, digits, tmp_path):
    client.register("digits", digits.onnx, data=digits.data)
    server.add_variant("digits", "copy", digits.onnx)
    server.add_variant("digits", "wrong", permuted_classes(digits.onnx, tmp_path / "wrong.onnx"))
    return client


def one(digits, i: int = 0) -> dict[str, np.ndarray]:
    return {"x": digits.x_test[i : i + 1]}


def test_a_70_30_split_lands_within_5_points_over_1000_requests(ab, digits, server):
    policy = ab.traffic("digits", {"baseline": 70, "copy": 30})
    assert policy["weights"] == pytest.approx({"baseline": 0.7, "copy": 0.3})
    counts = Counter(ab.infer("digits", one(digits, i % 400))[0] for i in range(1000))
    assert set(counts) == {"baseline", "copy"}
    assert abs(counts["copy"] / 1000 - 0.3) <= 0.05
    rows = {r["variant"]: r for r in ab.compare("digits")["variants"]}
    assert rows["baseline"]["requests"] == counts["baseline"] and rows["copy"]["requests"] == counts["copy"]
    assert rows["wrong"]["requests"] == 0 and rows["wrong"]["weight"] == 0
    labels = server.metrics.labels("digits", "copy")
    assert server.metrics.traffic_weight.labels(**labels)._value.get() == pytest.approx(0.3)


def test_sticky_callers_keep_their_variant_and_pinning_overrides_routing(ab, digits):
    ab.traffic("digits", {"baseline": 50, "copy": 50}, sticky="user_id")
    seen = {}
    for user in range(40):
        answers = {ab.infer("digits", one(digits), parameters={"user_id": f"u{user}"})[0] for _ in range(5)}
        assert len(answers) == 1, f"user u{user} moved between {answers}"
        seen[user] = answers.pop()
    assert set(seen.values()) == {"baseline", "copy"}
    # model_version pins whatever the weights say
    assert {ab.infer("digits", one(digits), variant="wrong")[0] for _ in range(10)} == {"wrong"}


def test_shadows_get_a_copy_without_changing_the_answer_and_their_agreement_is_measured(ab, digits, server):
    ab.traffic("digits", {"baseline": 100}, shadows=["copy", "wrong"])
    _, reference = ab.infer("digits", {"x": digits.x_test[:50]}, variant="baseline")
    for i in range(50):
        variant, out = ab.infer("digits", one(digits, i))
        assert variant == "baseline"
        np.testing.assert_array_equal(out["logits"], reference["logits"][i : i + 1])
    metrics = server.metrics

    def mirrored(variant: str) -> float:
        return metrics.shadow_requests.labels(**metrics.labels("digits", variant))._value.get()

    server.call(_drain(server))
    assert mirrored("copy") == 50 and mirrored("wrong") == 50
    rows = {r["variant"]: r for r in ab.compare("digits")["variants"]}
    assert rows["copy"]["shadow"] and rows["copy"]["shadow_agreement"] == 1.0
    assert rows["wrong"]["shadow_agreement"] == 0.0
    assert rows["copy"]["requests"] == 50  # a shadow's own latency on the same traffic is recorded


async def _drain(server) -> None:
    """Waits for mirrored calls still running."""
    import asyncio

    pending = list(server.server.dataplane._background)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


def test_promote_and_rollback_apply_live_and_persist_across_a_restart(ab, digits, server, server_factory):
    ab.traffic("digits", {"baseline": 70, "copy": 30})
    ab.promote("digits", "copy")
    assert {ab.infer("digits", one(digits))[0] for _ in range(20)} == {"copy"}
    assert ab.model("digits")["default_variant"] == "copy"
    repository = server.settings.repository
    server.stop()
    restarted = server_factory(repository)
    with SlimServeClient(restarted.address) as again:
        assert again.traffic("digits")["weights"] == {"copy": 1.0}
        assert {again.infer("digits", one(digits))[0] for _ in range(10)} == {"copy"}
        policy = again.rollback("digits")
        assert policy["weights"] == pytest.approx({"baseline": 0.7, "copy": 0.3}) and not policy["can_rollback"]
        with pytest.raises(SlimServeClientError, match="nothing to roll back") as e:
            again.rollback("digits")
        assert e.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    "change, code, message",
    [
        (lambda c: c.traffic("digits", {"baseline": 50, "nope": 50}), "NOT_FOUND", "has no variant 'nope'"),
        (lambda c: c.traffic("digits", {"baseline": -1}), "INVALID_ARGUMENT", "must be a number >= 0"),
        (lambda c: c.traffic("digits", {"baseline": 0}), "INVALID_ARGUMENT", "must sum to a positive number"),
        (lambda c: c.traffic("digits", {"baseline": 50, "copy": 50}, shadows=["copy"]), "INVALID_ARGUMENT", "both primary"),
        (lambda c: c.traffic("digits", {"baseline": 1}, sticky="user id"), "INVALID_ARGUMENT", "not a valid parameter name"),
        (lambda c: c.traffic("ghost", {"baseline": 1}), "NOT_FOUND", "not registered"),
        (lambda c: c.promote("digits", "nope"), "NOT_FOUND", "has no variant 'nope'"),
        (lambda c: c.delete_variant("digits", "baseline"), "FAILED_PRECONDITION", "cannot be removed"),
        (lambda c: c.delete_variant("digits", "nope"), "NOT_FOUND", "no variant 'nope'"),
    ],
)
def test_bad_routing_changes_are_refused_precisely_and_change_nothing(ab, digits, change, code, message):
    before = ab.traffic("digits")
    with pytest.raises(SlimServeClientError, match=message) as e:
        change(ab)
    assert e.value.code == code
    assert ab.traffic("digits") == before
    assert ab.infer("digits", one(digits))[0] == "baseline"


def test_deleting_a_routed_variant_under_load_fails_no_request(ab, digits, server):
    ab.traffic("digits", {"baseline": 50, "copy": 50})
    errors, answered = [], Counter()
    stop = threading.Event()

    def caller() -> None:
        with SlimServeClient(server.address) as c:
            while not stop.is_set():
                try:
                    answered[c.infer("digits", one(digits))[0]] += 1
                except Exception as e:
                    errors.append(e)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        while sum(answered.values()) < 200:
            threading.Event().wait(0.01)
        record = ab.delete_variant("digits", "copy")
        after = sum(answered.values())
        while sum(answered.values()) < after + 200:
            threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == []
    assert answered["copy"] > 0 and "copy" not in [v["name"] for v in record["variants"]]
    assert record["traffic"]["weights"] == {"baseline": 1.0}
    assert not (server.settings.repository / "models" / "digits" / "variants" / "copy").exists()
    assert {ab.infer("digits", one(digits))[0] for _ in range(10)} == {"baseline"}


def test_feedback_measures_online_accuracy_per_variant(ab, digits, server):
    ab.traffic("digits", {"baseline": 50, "wrong": 50})
    answered = Counter()
    for i in range(120):
        answer = ab.infer_full("digits", one(digits, i))
        assert answer.request_id  # the server names requests that came without an id
        result = ab.feedback("digits", answer.request_id, int(digits.y_test[i]))
        assert result["variant"] == answer.variant
        answered[answer.variant] += 1
    rows = {r["variant"]: r for r in ab.compare("digits")["variants"]}
    assert rows["baseline"]["feedback"] == answered["baseline"] and rows["wrong"]["feedback"] == answered["wrong"]
    assert rows["baseline"]["online_accuracy"] > 0.8 and rows["wrong"]["online_accuracy"] < 0.3
    low, high = rows["baseline"]["online_accuracy_ci"]
    assert low <= rows["baseline"]["online_accuracy"] <= high
    assert rows["wrong"]["accuracy_verdict"].startswith("less accurate")
    assert rows["baseline"]["offline_accuracy"] == pytest.approx(digits.accuracy) or rows["baseline"]["offline_accuracy"] is None
    # a client's own id works too; one label per request; unknown ids are named
    answer = ab.infer_full("digits", one(digits), request_id="req-42")
    assert answer.request_id == "req-42"
    ab.feedback("digits", "req-42", int(digits.y_test[0]))
    with pytest.raises(SlimServeClientError, match="already has a label") as e:
        ab.feedback("digits", "req-42", 3)
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(SlimServeClientError, match="no recent request with id 'ghost'") as e:
        ab.feedback("digits", "ghost", 3)
    assert e.value.code == "NOT_FOUND"
    correct = server.metrics.feedback.labels(**server.metrics.labels("digits", "baseline"), correct="true")._value.get()
    assert correct >= 1


LOAD = """
import sys, threading, grpc, numpy as np
from slimserve.client import codec
from slimserve.protos import inference_pb2 as pb
address, callers, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
errors, wrong = [], []
def caller(k):
    x = rng.normal(size=(1, 1024)).astype(np.float32) + k
    request = pb.ModelInferRequest(model_name="mlp")
    codec.fill_input(request, "x", x, raw=True)
    payload = request.SerializeToString()
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(calls):
            try:
                response = pb.ModelInferResponse.FromString(infer(payload, timeout=30))
                y = codec.decode_response_outputs(response)["y"]
                if y.shape != (1, 1024) or not np.allclose(y, np.tanh(x * 2.0), atol=1e-5):
                    wrong.append(k)
            except grpc.RpcError as e:
                errors.append(e.code().name)
threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
for t in threads: t.start()
for t in threads: t.join()
print(len(errors), len(wrong), sorted(set(errors)))
"""


def heavy_mlp(path: Path) -> Path:
    """y = tanh(2x) computed the long way (x @ I 32 times, 1024 x 1024): ~2 ms a call of one sample on one thread,
    ~0.9 ms a sample in a batch of 8, so callers pile up behind every call even on a loaded 2-core CI machine (at 8
    matmuls, ~0.6 ms a call, the calls kept up with the callers there and batches averaged 1.4)."""
    from onnx import TensorProto, helper

    eye = numpy_helper.from_array(np.eye(1024, dtype=np.float32), "eye")
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes, prev = [], "x"
    for i in range(32):
        nodes.append(helper.make_node("MatMul", [prev, "eye"], [f"h{i}"]))
        prev = f"h{i}"
    nodes += [helper.make_node("Mul", [prev, "two"], ["h_two"]), helper.make_node("Tanh", ["h_two"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])],
        [eye, two],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def test_concurrent_single_sample_callers_are_batched_and_each_gets_its_own_rows(server_factory, tmp_path):
    """16 callers in another process (as real clients are), on a model whose compute callers overlap. One call in
    flight, and each call held (up to 0.5 s) until 3 requests are queued behind it, so that callers pile up however
    fast or loaded the machine is: with two calls, and then with one call alone, a loaded CI machine averaged batches
    of 1.4 (the client process's 16 threads sent slower than the calls ran). What is checked is that queued requests
    merge and each caller gets its own rows back."""
    import subprocess
    import sys
    import time

    from slimserve.client.client import SlimServeClient

    server = server_factory(max_concurrent_calls=1, inline_compute_ms=0)  # calls on the pool: the loop queues meanwhile
    with SlimServeClient(server.address) as client:
        client.register("mlp", heavy_mlp(tmp_path / "mlp.onnx"))
        batcher = server.server.dataplane.models["mlp"].variants["baseline"].batcher
        predict = batcher.predict

        def held(inputs, outputs):
            until = time.monotonic() + 0.5
            while batcher.queued < 3 and time.monotonic() < until:
                time.sleep(0.001)
            return predict(inputs, outputs)

        batcher.predict = held
        result = subprocess.run(
            [sys.executable, "-c", LOAD, server.address, "16", "40"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[:2] == ["0", "0"], result.stdout  # no errors, every answer the caller's own
        [row] = client.compare("mlp")["variants"]
        assert row["requests"] == 640 and row["mean_batch"] > 2.0, row  # 5-6 measured, loaded or not
        batch_sum = server.metrics.registry.get_sample_value("slimserve_batch_size_sum", server.metrics.labels("mlp", "baseline"))
        assert batch_sum == 640  # every sample counted once in the executed batches


def test_slimctl_traffic_promote_rollback_compare_feedback(ab, digits, server):
    runner = CliRunner()

    def slimctl(*args):
        return runner.invoke(app, ["--server", server.address, *map(str, args)])

    result = slimctl("traffic", "digits", "baseline=70", "copy=30", "--shadow", "wrong")
    assert result.exit_code == 0, result.output
    assert "70.0%" in result.output and "shadow" in result.output
    result = slimctl("traffic", "digits", "--json")
    assert json.loads(result.stdout)["shadows"] == ["wrong"]
    for bad, message in [
        (("traffic", "digits", "baseline"), "is not VARIANT=WEIGHT"),
        (("traffic", "digits", "baseline=x"), "must be a number"),
        (("promote", "digits", "nope"), "has no variant 'nope'"),
    ]:
        result = slimctl(*bad)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    result = slimctl("infer", "digits", digits.data, "--json")
    request_id = json.loads(result.stdout)["request_id"]
    assert request_id
    result = slimctl("promote", "digits", "copy")
    assert result.exit_code == 0 and "100.0%" in result.output
    result = slimctl("rollback", "digits", "--json")
    assert json.loads(result.stdout)["weights"] == pytest.approx({"baseline": 0.7, "copy": 0.3})
    result = slimctl("compare", "digits")
    assert result.exit_code == 0, result.output
    for header in ("variant", "p99 ms", "$/1k inf", "online acc"):
        assert header in result.output
    rows = json.loads(slimctl("compare", "digits", "--json").stdout)["variants"]
    assert next(r["variant"] for r in rows) == "baseline"
    assert set(rows[0]) >= {
        "weight",
        "requests",
        "errors",
        "latency_p50_ms",
        "latency_p90_ms",
        "latency_p99_ms",
        "mean_batch",
        "cost_per_1000",
        "offline_accuracy",
        "online_accuracy",
        "online_accuracy_ci",
        "latency_verdict",
        "accuracy_verdict",
    }
    result = slimctl("delete", "digits", "--variant", "wrong")
    assert result.exit_code == 0 and "deleted digits variant wrong" in result.output
