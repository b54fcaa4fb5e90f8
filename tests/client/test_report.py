"""Tests for client/report.py: the one terminal table of an optimization report, for plain and auto-search rows."""

from __future__ import annotations

from rich.console import Console

from slimserve.client.report import render_report
from slimserve.optimizer.evaluation.measure import Evaluation
from slimserve.optimizer.report import report_rows

# The report rows' tests' three evaluations: one set of numbers that both test modules read.
from tests.optimizer.test_report import BASELINE, PRUNED, QUANTIZED


def _text(table, width: int = 160) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_table_has_one_row_per_variant_and_units_in_headers():
    rows = report_rows({"pruned": PRUNED, "baseline": BASELINE, "quantized": QUANTIZED})
    table = render_report(rows, "digits: variants against baseline")
    assert table.row_count == 3
    headers = [str(c.header) for c in table.columns]
    assert "size (MB)" in headers and "MFLOPs" in headers and "p50 ms" in headers and "speed-up ×" in headers
    text = _text(table)
    assert "4.00×" in text and "0.50×" in text and "-0.75" in text and "digits: variants against baseline" in text


def test_a_long_variant_name_and_every_header_fit_160_columns():
    rows = report_rows({"baseline": BASELINE, "prune-structured+quantize-static": QUANTIZED})
    text = _text(render_report(rows, "digits"))
    assert "…" not in text  # no name, header or number cut short: a long name folds onto a second line
    assert "prune-structured+qu" in text and "antize-static" in text
    assert all(len(line) <= 160 for line in text.splitlines())


def test_columns_no_row_fills_are_left_out():
    plain = Evaluation(latency_p50_ms=1.0, runtime="torch")
    rows = report_rows({"baseline": plain, "v": Evaluation(latency_p50_ms=0.5, runtime="torch")})
    headers = [str(c.header) for c in render_report(rows, "t").columns]
    assert headers == ["variant", "runtime", "p50 ms", "speed-up ×"]


def test_an_auto_search_table_shows_the_candidates_and_what_decides():
    rows = report_rows({"baseline": BASELINE, "auto": QUANTIZED, "graph-ort": PRUNED})
    rows[0].update(recipe="", status="baseline", within_budget=True, pareto=False, chosen=False)
    rows[1].update(recipe="quantize-static", status="measured", within_budget=True, pareto=True, chosen=True)
    rows[2].update(recipe="graph-ort", status="skipped: needs train data", within_budget=None, pareto=False, chosen=False)
    table = render_report(rows, "auto")
    headers = [str(c.header) for c in table.columns]
    assert headers[:2] == ["recipe", "status"] and headers[-3:] == ["in budget", "Pareto", "chosen"]
    assert "variant" not in headers and "agree %" not in headers
    text = _text(table)
    assert "quantize-static" in text and "skipped: needs train data" in text and "✓" in text


def test_an_unlabelled_search_table_shows_the_metric_the_reference_and_the_search_cost():
    base = Evaluation(latency_p50_ms=4.0, size_bytes=90_000_000, quality_metric="cosine", runtime="torch")
    ref = Evaluation(latency_p50_ms=1.0, size_bytes=90_000_000, quality_metric="cosine", quality=1.0, quality_drop=0.0)
    int8 = Evaluation(latency_p50_ms=0.46, size_bytes=23_000_000, quality_metric="cosine", quality=0.9931, quality_drop=0.69)
    rows = report_rows({"baseline": base, "auto": int8, "fp32-onnxruntime": ref}, reference=("fp32-onnxruntime", ref))
    rows[0].update(
        recipe="",
        status="baseline",
        within_budget=True,
        pareto=False,
        chosen=False,
        reference="fp32-onnxruntime",
        reference_runtime="onnxruntime",
        reference_p50_ms=1.0,
        search_evaluations=4,
        search_timings=1,
        search_seconds=12.5,
    )
    rows[1].update(recipe="quantize-dynamic", status="measured", within_budget=True, pareto=True, chosen=True, reference_speedup_x=2.16)
    rows[2].update(recipe="fp32-onnxruntime", status="reference", within_budget=True, pareto=True, chosen=False)
    table = render_report(rows, "minilm: auto")
    headers = [str(c.header) for c in table.columns]
    assert {"metric", "quality", "Δ quality", "vs FP32 ×"} <= set(headers)
    text = _text(table)
    flat = " ".join(text.split())
    assert "cosine" in text and "0.9931" in text and "-0.69" in text and "2.16×" in text
    assert "reference: fp32-onnxruntime on onnxruntime at 1.0 ms" in flat and "search: 4 evaluations, 1 timings in turns, 12.5 s" in flat
    assert "+0.00" in text and "-0.00" not in text
    assert all(len(line) <= 160 for line in text.splitlines())


def test_a_labelled_table_names_accuracy_without_repeating_it():
    rows = report_rows({"baseline": BASELINE, "quantized": QUANTIZED})
    for row, metric in zip(rows, ("accuracy", "accuracy")):
        row["metric"] = metric
    headers = [str(c.header) for c in render_report(rows, "t").columns]
    assert "metric" in headers and "quality" not in headers and "Δ quality" not in headers and "Δ pts" in headers


def test_the_thread_count_each_row_was_timed_at_is_shown():
    rows = report_rows({"baseline": Evaluation(latency_p50_ms=1.0, threads=2), "v": Evaluation(latency_p50_ms=0.5, threads=1)})
    table = render_report(rows, "t")
    assert [str(c.header) for c in table.columns] == ["variant", "threads", "p50 ms", "speed-up ×"]
    assert list(table.columns[1].cells) == ["2", "1"]
