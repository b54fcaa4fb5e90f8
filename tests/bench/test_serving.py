"""bench.serving's arithmetic: requests with INT64 inputs, dollars per million from the server's price table, the real-model targets."""

from __future__ import annotations

import numpy as np

from bench.inprocess import limits
from bench.loadgen import PointResult, build_infer_request
from bench.report import check_real_targets
from bench.servers import Server, Target
from bench.serving import summarize
from slimserve.protos import inference_pb2 as pb
from slimserve.server.telemetry.pricing import DEFAULT_PRICES_PER_HOUR


def test_a_request_carries_every_input_with_its_datatype_raw():
    ids = np.arange(128, dtype=np.int64)[None]
    mask = np.ones((1, 128), np.int64)
    request = pb.ModelInferRequest.FromString(build_infer_request("minilm", {"input_ids": ids, "attention_mask": mask}, version="2"))
    assert (request.model_name, request.model_version) == ("minilm", "2")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("input_ids", "INT64", [1, 128]),
        ("attention_mask", "INT64", [1, 128]),
    ]
    np.testing.assert_array_equal(np.frombuffer(request.raw_input_contents[0], np.int64), ids[0])


def test_a_row_costs_the_node_price_over_the_requests_it_answers_in_an_hour():
    target = Target("slimserve", "slimserve", Server("s", [], 1), b"")
    point = PointResult("slimserve", 16, 10.0, 200, np.full(200, 5.0), server_cpu_s=4.0, server_rss_bytes=300 * 2**20)
    price = DEFAULT_PRICES_PER_HOUR["cpu"]
    row = summarize(target, [point], price)
    assert row["throughput_rps"] == 20.0
    assert row["dollars_per_million"] == price / 3600 / 20.0 * 1e6
    assert row["server_cpu_s_per_1000"] == 20.0  # 4 CPU seconds for 200 requests
    assert row["server_rss_mb"] == 300


def _row(target: str, c: int, rps: float, p50: float) -> dict:
    return {"target": target, "concurrency": c, "throughput_rps": rps, "p50_ms": p50, "errors": 0}


def test_real_model_targets_are_ratios_of_this_run():
    result = {
        "model_key": "minilm",
        "serving": [
            _row("kserve", 1, 10, 100.0),
            _row("mlserver", 1, 8, 120.0),
            _row("slimserve", 1, 10, 95.0),
            _row("slimserve:auto", 1, 25, 50.0),
            _row("kserve", 16, 10, 1600.0),
            _row("mlserver", 16, 5, 3200.0),
            _row("slimserve", 16, 13, 1200.0),
            _row("slimserve:auto", 16, 30, 500.0),
        ],
        "inprocess_best_samples_per_s": 14.0,
        "inprocess_limits": {"minilm": {"best_samples_per_s": 14.0}, "minilm-auto": {"best_samples_per_s": 40.0}},
        "auto_variant": {"metric": "cosine", "quality_drop_pt": 0.4},
    }
    checks = {c["check"]: (c["measured"], c["met"]) for c in check_real_targets(result)}
    assert checks["auto variant: req/s at 16 callers vs KServe (FP32)"] == ("3.00x", False)  # issue 25: 4x
    assert checks["auto variant: req/s at 16 callers vs MLServer (FP32)"] == ("6.00x", True)
    assert checks["auto variant: p50 at 1 caller vs KServe's"] == ("0.50x", False)  # issue 25: 0.4x
    assert checks["auto variant: req/s at 16 callers vs its own in-process ORT best"] == ("75%", False)  # 30 of 40
    assert checks["same FP32 file: req/s at 16 callers vs KServe (FP32)"] == ("1.30x", True)
    assert checks["same FP32 file: p50 at 1 caller vs KServe's"] == ("0.95x", True)
    assert "same FP32 file: p99 at 16 callers vs KServe's" not in checks  # no p99 in these rows
    assert checks["same FP32 file: req/s at 16 callers vs its own in-process ORT best"] == ("93%", True)
    assert checks["auto variant: quality lost (cosine, points)"] == ("0.40", True)


def test_inprocess_limits_name_batch_one_and_the_best_run():
    rows = [
        {"name": "batch 1", "batch": 1, "streams": 1, "samples_per_s": 7.0},
        {"name": "batch 4", "batch": 4, "streams": 1, "samples_per_s": 6.0},
        {"name": "batch 1, 2 streams x 1 thread", "batch": 1, "streams": 2, "samples_per_s": 13.0},
    ]
    assert limits(rows) == {"batch1_samples_per_s": 7.0, "best_samples_per_s": 13.0, "best_run": "batch 1, 2 streams x 1 thread"}


def test_the_auto_summary_is_the_picked_row_not_the_last_candidate():
    from bench.serving_models import summarize_report

    rows = [
        {"variant": "baseline", "runtime": "onnxruntime", "quality": None},
        {"variant": "auto", "recipe": "quantize-dynamic", "runtime": "onnxruntime", "metric": "cosine", "quality": 0.9932},
        {"variant": "distill-soft,graph-ort", "recipe": "distill-soft,graph-ort", "runtime": None, "quality": None},
    ]
    summary = summarize_report(rows)
    assert summary["recipe"] == "quantize-dynamic" and summary["quality"] == 0.9932
