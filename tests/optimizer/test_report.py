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
