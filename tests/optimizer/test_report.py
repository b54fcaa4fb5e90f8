"""Tests for optimizer/report.py: ratios against the baseline, and the JSON report."""

from __future__ import annotations

import json

import pytest

from slimserve.optimizer.evaluation.measure import Evaluation
from slimserve.optimizer.report import COLUMNS, report_rows, to_json

BASELINE = Evaluation(
    params=1000,
    nonzero_params=1000,
    size_bytes=4_000_000,
    flops=2e6,
    latency_p50_ms=2.0,
    latency_p99_ms=3.0,
    serving_batch=32,
    throughput=1000.0,
    accuracy=0.95,
    runtime="onnxruntime",
    device="cpu",
)
QUANTIZED = Evaluation(
    params=1000,
    nonzero_params=750,
    size_bytes=1_000_000,
    flops=2e6,
    latency_p50_ms=0.5,
    latency_p99_ms=1.0,
    serving_batch=32,
    throughput=2500.0,
    accuracy=0.9425,
    accuracy_delta=-0.75,
    agreement=0.98,
    runtime="onnxruntime",
)
PRUNED = Evaluation(size_bytes=2_000_000, flops=5e5, latency_p50_ms=4.0, throughput=500.0, runtime="torch")


@pytest.fixture
def rows():
    return report_rows({"pruned": PRUNED, "baseline": BASELINE, "quantized": QUANTIZED})


def test_reductions_and_speed_ups_are_against_the_baseline(rows):
    by_name = {r["variant"]: r for r in rows}
    q, p, b = by_name["quantized"], by_name["pruned"], by_name["baseline"]
    assert q["size_reduction_x"] == 4.0 and q["size_pct_of_baseline"] == 25.0
    assert q["speedup_x"] == 4.0  # baseline p50 / variant p50
    assert q["throughput_ratio_x"] == 2.5
    assert q["compute_reduction_x"] == 1.0
    assert q["sparsity_pct"] == 25.0
    assert q["accuracy_pct"] == 94.25 and q["accuracy_delta_pt"] == -0.75 and q["agreement"] == 0.98
    assert p["speedup_x"] == 0.5  # slower: a speed-up below 1
    assert p["compute_reduction_x"] == 4.0 and p["size_reduction_x"] == 2.0
    assert p["accuracy_pct"] is None and p["accuracy_delta_pt"] is None and p["sparsity_pct"] is None
    assert b["speedup_x"] == 1.0 and b["size_pct_of_baseline"] == 100.0
    assert b["accuracy_delta_pt"] is None and b["agreement"] is None


def test_the_baseline_comes_first_and_every_row_has_every_column(rows):
    assert [r["variant"] for r in rows] == ["baseline", "pruned", "quantized"]
    assert all(tuple(r) == COLUMNS for r in rows)


def test_without_a_baseline_the_ratios_are_absent():
    (row,) = report_rows({"quantized": QUANTIZED})
    assert row["speedup_x"] is None and row["size_reduction_x"] is None and row["latency_p50_ms"] == 0.5


def test_json_round_trips(rows):
    assert json.loads(to_json(rows)) == rows


def test_rows_name_the_quality_metric_and_the_speed_against_the_reference():
    base = Evaluation(latency_p50_ms=4.0, quality_metric="cosine")
    reference = Evaluation(latency_p50_ms=1.0, quality_metric="cosine", quality=1.0, quality_drop=0.0)
    variant = Evaluation(latency_p50_ms=0.5, quality_metric="cosine", quality=0.9931, quality_min=0.97, quality_drop=0.69, agreement=0.9931)
    rows = report_rows({"baseline": base, "fp32": reference, "int8": variant}, reference=("fp32", reference))
    assert [r["metric"] for r in rows] == ["cosine"] * 3
    assert rows[2]["quality"] == 0.9931 and rows[2]["quality_min"] == 0.97 and rows[2]["quality_drop_pt"] == 0.69
    assert rows[2]["speedup_x"] == 8.0 and rows[2]["reference_speedup_x"] == 2.0 and rows[0]["reference_speedup_x"] == 0.25
    assert rows[0]["quality_drop_pt"] is None
    assert all(r["reference_speedup_x"] is None for r in report_rows({"baseline": base, "int8": variant}))


def test_the_speed_up_timed_in_turns_and_every_output_are_reported():
    from rich.console import Console

    from slimserve.client.report import render_report

    qualities = {
        "boxes": {"metric": "relative-error", "value": 0.05, "drop": 5.0, "worst": None},
        "scores": {"metric": "top1-agreement", "value": 1.0, "drop": 0.0, "worst": None},
    }
    timed = Evaluation(latency_p50_ms=0.5, speedup_x=1.8, speedup_ci=[1.7, 1.9], threads=2, qualities=qualities, quality_output="boxes")
    base = Evaluation(latency_p50_ms=2.0, qualities={k: {**q, "drop": None} for k, q in qualities.items()})
    row = report_rows({"baseline": base, "v": timed})[1]
    assert row["speedup_x"] == 1.8 and row["speedup_ci"] == [1.7, 1.9] and row["threads"] == 2  # not 2.0 / 0.5
    assert row["quality_output"] == "boxes"
    assert row["quality_by_output"] == [
        {"output": "boxes", "metric": "relative-error", "value": 0.05, "drop_pt": 5.0, "worst": None},
        {"output": "scores", "metric": "top1-agreement", "value": 1.0, "drop_pt": 0.0, "worst": None},
    ]
    console = Console(width=200, record=True)
    console.print(render_report(report_rows({"baseline": base, "v": timed}), "t"))
    text = console.export_text()
    assert "Δ per output" in text and "boxes -5.00 · scores +0.00" in text
