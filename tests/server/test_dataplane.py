"""The per-request path of server/inference/dataplane.py: routing, what is recorded of each outcome, and what a refresh keeps."""

from __future__ import annotations

import time

import numpy as np
import pytest

from slimserve.client.codec import TensorCodecError
from slimserve.server.errors import DeadlineExceeded, InvalidArgument, NotFound
from slimserve.server.inference.dataplane import InferRequest
from tests.server.test_control import add_copy, control_of, infer, register, run, sample


def test_a_refresh_keeps_feedback_and_the_statistics_of_variants_still_served(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            plane = control.dataplane
            await register(control, "digits", digits.onnx)
            await infer(control, digits.x_test[:1], request_id="before")
            served = plane.models["digits"].variants["baseline"]
            await add_copy(control, "digits", "copy", digits.onnx)  # a refresh
            assert plane.models["digits"].variants["baseline"] is served and served.stats.requests == 1
            assert (await control.feedback("digits", "before", int(digits.y_test[0]))).correct

    run(scenario())


def test_every_outcome_is_recorded_against_the_routed_variant(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            plane, metrics = control.dataplane, control.dataplane.loader.metrics
            await register(control, "digits", digits.onnx)

            def malformed():
                raise TensorCodecError("input 'x': 3 bytes is not a whole number of FP32 values")

            with pytest.raises(TensorCodecError):  # tensors are decoded once routed: a bad one counts for the variant
                await plane.serve(InferRequest("digits", "", "", malformed))
            with pytest.raises(InvalidArgument, match="input 'x': expected FP32"):
                await infer(control, np.zeros((1, 2), np.float32))
            with pytest.raises(NotFound, match="has no variant 'nope'"):
                await infer(control, digits.x_test[:1], version="nope")  # refused before it is routed: not counted
            await infer(control, digits.x_test[:1])
            assert sample(metrics, "slimserve_requests_total", "baseline", code="INVALID_ARGUMENT") == 2
            assert sample(metrics, "slimserve_requests_total", "baseline", code="OK") == 1
            assert sample(metrics, "slimserve_request_duration_seconds_count", "baseline") == 3
            assert sample(metrics, "slimserve_inflight_requests", "baseline") == 0
            stats = plane.models["digits"].variants["baseline"].stats
            assert (stats.requests, stats.errors, stats.samples) == (3, 2, 1)

    run(scenario())


def test_request_ids_are_made_up_when_missing_and_kept_when_given(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            await register(control, "digits", digits.onnx)
            x = digits.x_test[:1]
            made = [(await control.dataplane.serve(InferRequest("digits", "", "", lambda: {"x": x}))).request_id for _ in range(2)]
            assert made[0] != made[1] and all(made)
            given = await control.dataplane.serve(InferRequest("digits", "", "mine", lambda: {"x": x}))
            assert given.request_id == "mine"

    run(scenario())


def test_an_answer_with_a_deadline_reports_when_it_left_and_a_timeout_counts_from_the_transports_receipt(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            await register(control, "digits", digits.onnx)
            x = digits.x_test[:1]
            plain = InferRequest("digits", "", "", lambda: {"x": x})
            await control.dataplane.serve(plain)
            assert plain.on_sent is None  # no deadline: nothing to report, nothing paid
            timed = InferRequest("digits", "", "", lambda: {"x": x}, parameters={"timeout": 30_000_000})
            await control.dataplane.serve(timed)
            batcher = control.dataplane.models["digits"].variants["baseline"].batcher
            before = len(batcher.answer_time)
            timed.on_sent("the gRPC context")  # what the transport calls once the answer left
            assert len(batcher.answer_time) == before + 1 and 0 <= batcher.answer_time._recent[-1][1] < 30
            # received by the transport 1 s ago with a 0.5 s timeout: past it before it reaches the batcher
            late = InferRequest("digits", "", "", lambda: {"x": x}, parameters={"timeout": 500_000}, arrived=time.perf_counter() - 1)
            with pytest.raises(DeadlineExceeded, match="deadline passed"):
                await control.dataplane.serve(late)

    run(scenario())


def test_a_sticky_parameter_pins_a_caller_to_one_variant(tmp_path, digits):
    async def scenario():
        async with control_of(tmp_path) as control:
            await register(control, "digits", digits.onnx)
            await add_copy(control, "digits", "copy", digits.onnx)
            await control.set_traffic("digits", {"baseline": 50, "copy": 50}, [], "user")
            x = digits.x_test[:1]
            for user in ("ann", "bob", "cy"):
                got = {
                    (await control.dataplane.serve(InferRequest("digits", "", "", lambda: {"x": x}, parameters={"user": user}))).variant
                    for _ in range(8)
                }
                assert len(got) == 1, (user, got)

    run(scenario())


def test_each_failure_is_counted_under_its_code():
    import asyncio

    from slimserve.server.errors import ResourceExhausted
    from slimserve.server.inference.dataplane import outcome_code

    assert outcome_code(ResourceExhausted("queue full")) == "RESOURCE_EXHAUSTED"
    assert outcome_code(TensorCodecError("bad bytes")) == "INVALID_ARGUMENT"
    assert outcome_code(asyncio.CancelledError()) == "DEADLINE_EXCEEDED"  # the caller left: not the server's fault
    assert outcome_code(ZeroDivisionError()) == "INTERNAL"


def test_a_request_cancelled_while_it_runs_is_counted_and_leaves_nothing_in_flight(tmp_path, digits):
    import asyncio

    async def scenario():
        async with control_of(tmp_path) as control:
            plane, metrics = control.dataplane, control.dataplane.loader.metrics
            await register(control, "digits", digits.onnx)
            batcher = plane.models["digits"].variants["baseline"].batcher
            started = asyncio.Event()

            async def never_answers(inputs, outputs=None):
                started.set()
                await asyncio.sleep(60)

            batcher.submit = never_answers
            task = asyncio.create_task(plane.serve(InferRequest("digits", "", "", lambda: {"x": digits.x_test[:1]})))
            await started.wait()
            assert sample(metrics, "slimserve_inflight_requests", "baseline") == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert sample(metrics, "slimserve_requests_total", "baseline", code="DEADLINE_EXCEEDED") == 1
            assert sample(metrics, "slimserve_inflight_requests", "baseline") == 0

    run(scenario())


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 4), np.float32)}, None),
        ({"x": np.zeros((1, 4), ">f4")}, "got numpy >f4"),  # FP32, but not little-endian
        ({"x": np.zeros((1, 4), np.float64)}, "expected FP32 [-1,4], got FP64 [1,4]"),
        ({"x": np.zeros((1, 5), np.float32)}, "expected FP32 [-1,4], got FP32 [1,5]"),
        ({"x": np.zeros((4,), np.float32)}, "expected FP32 [-1,4], got FP32 [4]"),
        ({}, "input 'x' is missing"),
        ({"x": np.zeros((1, 4), np.float32), "y": np.zeros(1, np.float32)}, "has no input 'y'"),
        ({"x": np.zeros((1, 4), np.float32), "t": np.array([["a"]])}, None),  # BYTES given as a str array
        ({"x": np.zeros((1, 4), np.float32), "t": np.array([[b"a"]], dtype=object)}, None),
        ({"x": np.zeros((1, 4), np.float32), "t": np.array([["a", "b"]])}, "expected BYTES [-1,1], got BYTES [1,2]"),
    ],
)
def test_input_checks_pass_what_fits_and_name_what_does_not(arrays, message):
    from slimserve.server.inference.dataplane import check_inputs
    from slimserve.server.runtimes import TensorSpec

    specs = [TensorSpec("x", "FP32", (-1, 4))]
    if "t" in arrays:
        specs.append(TensorSpec("t", "BYTES", (-1, 1)))
    if message is None:
        check_inputs("m", specs, arrays)
    else:
        with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_inputs("m", specs, arrays)


def test_the_class_kept_for_feedback_is_top1_for_every_output_shape():
    # What _answered keeps for a one-sample answer is shadow.top1's class, ties and higher ranks included.
    from slimserve.server.inference.dataplane import Call, DataPlane
    from slimserve.server.inference.shadow import top1
    from slimserve.server.telemetry.statistics import FeedbackStore

    rng = np.random.default_rng(0)
    outputs = [
        rng.random((1, 10), np.float32),
        rng.random((1, 2, 5)),
        np.zeros((1, 4), np.float32),
        rng.random((1, 3, 2)).transpose(0, 2, 1),
    ]
    outputs.append(np.array([[0.1, 0.9, 0.9]], np.float32))
    for i, array in enumerate(outputs):
        feedback = FeedbackStore()
        call = Call("m", "v", None, None, f"r{i}", feedback)
        DataPlane._answered(None, call, {}, None, {}, {"out": array})
        want = int(top1({"out": array})[0])
        assert feedback.feedback(f"r{i}", want).correct, (array.shape, want)
