"""The optimization report: one row per variant against the baseline (size, compute, latency, throughput, accuracy).

Rows are plain dicts whose keys carry their units (`latency_p50_ms`, `speedup_x`, `accuracy_delta_pt`), so
that they read well both as JSON and as column headers; `render_table` formats them for a terminal.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich.table import Table

from optimizer.evaluation import Evaluation

# Row keys, in column order; they are the report's JSON contract.
COLUMNS = (
    "variant",
    "runtime",
    "size_bytes",
    "size_reduction_x",  # baseline bytes / variant bytes
    "size_pct_of_baseline",
    "flops",  # per sample
    "compute_reduction_x",  # baseline FLOPs / variant FLOPs
    "sparsity_pct",  # share of parameters that are zero
    "latency_p50_ms",  # batch 1
    "speedup_x",  # baseline p50 / variant p50, batch 1
    "throughput_per_s",  # samples / s at the serving batch
    "throughput_ratio_x",  # variant / baseline
    "accuracy_pct",
    "accuracy_delta_pt",  # percentage points against the baseline
    "agreement",  # top-1 agreement with the baseline (or cosine similarity), 0-1
)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or not math.isfinite(numerator / denominator):
        return None
    return numerator / denominator


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def report_rows(evaluations: dict[str, Evaluation], baseline: str = "baseline") -> list[dict[str, Any]]:
    """One row per variant, the baseline first; ratios are None where the baseline or the variant lacks the measure."""
    base = evaluations.get(baseline)
    names = ([baseline] if base is not None else []) + [n for n in evaluations if n != baseline]
    rows = []
    for name in names:
        e = evaluations[name]
        b = base or Evaluation()
        sparsity = None
        if e.params and e.nonzero_params is not None:
            sparsity = 100.0 * (1.0 - e.nonzero_params / e.params)
        accuracy_delta = e.accuracy_delta
        if accuracy_delta is None and e.accuracy is not None and b.accuracy is not None and name != baseline:
            accuracy_delta = (e.accuracy - b.accuracy) * 100.0
        size_fraction = _ratio(e.size_bytes, b.size_bytes)
        rows.append({
            "variant": name,
            "runtime": e.runtime,
            "size_bytes": e.size_bytes,
            "size_reduction_x": _round(_ratio(b.size_bytes, e.size_bytes), 3),
            "size_pct_of_baseline": _round(None if size_fraction is None else 100.0 * size_fraction, 2),
            "flops": e.flops,
            "compute_reduction_x": _round(_ratio(b.flops, e.flops), 3),
            "sparsity_pct": _round(sparsity, 2),
            "latency_p50_ms": _round(e.latency_p50_ms, 4),
            "speedup_x": _round(_ratio(b.latency_p50_ms, e.latency_p50_ms), 3),
            "throughput_per_s": _round(e.throughput, 1),
            "throughput_ratio_x": _round(_ratio(e.throughput, b.throughput), 3),
            "accuracy_pct": _round(None if e.accuracy is None else 100.0 * e.accuracy, 2),
            "accuracy_delta_pt": None if name == baseline else _round(accuracy_delta, 2),
            "agreement": None if name == baseline else _round(e.agreement, 4),
        })
    return rows


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, allow_nan=False)


# ---- terminal table

_MISSING = "[dim]–[/dim]"


def _scale(values: list[float | None], units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    """The largest unit the biggest value fills at least once, so that one header names the unit of its column."""
    biggest = max((v for v in values if v is not None), default=0.0)
    for factor, unit in units:
        if biggest >= factor:
            return factor, unit
    return units[-1]


def _number(value: float | None, digits: int) -> str:
    return _MISSING if value is None else f"{value:,.{digits}f}"


def _gain(value: float | None, baseline_row: bool) -> str:
    """A ratio where more is better: green above 1, red below, plain for the baseline."""
    if value is None:
        return _MISSING
    text = f"{value:.2f}×"
    if baseline_row or abs(value - 1.0) < 0.05:  # within timing noise
        return text
    return f"[green]{text}[/green]" if value > 1.0 else f"[red]{text}[/red]"


def _delta(value: float | None) -> str:
    if value is None:
        return _MISSING
    text = f"{value:+.2f}"
    return f"[red]{text}[/red]" if value < -0.005 else f"[green]{text}[/green]" if value > 0.005 else text


def render_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The rows as a rich table: one row per variant, units in the headers, gains in green and losses in red."""
    size_factor, size_unit = _scale([r.get("size_bytes") for r in rows], ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "B")))
    flop_factor, flop_unit = _scale(
        [r.get("flops") for r in rows], ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs"), (1.0, "FLOPs"))
    )
    table = Table(
        title=title,
        caption="speed-up: baseline p50 / variant p50 at batch 1 · Δ accuracy in percentage points · "
        "agreement: share of top-1 answers equal to the baseline's (cosine similarity for non-classifiers)",
        caption_justify="left",
    )
    table.add_column("variant", style="bold", no_wrap=True)
    table.add_column("runtime", no_wrap=True)
    table.add_column(f"size ({size_unit})", justify="right")
    table.add_column("smaller (×)", justify="right")
    table.add_column("of base (%)", justify="right")
    table.add_column(f"{flop_unit}/sample", justify="right")
    table.add_column("less compute (×)", justify="right")
    table.add_column("sparsity (%)", justify="right")
    table.add_column("p50 batch 1 (ms)", justify="right")
    table.add_column("speed-up (×)", justify="right")
    table.add_column("throughput (samples/s)", justify="right")
    table.add_column("throughput (×)", justify="right")
    table.add_column("accuracy (%)", justify="right")
    table.add_column("Δ accuracy (pt)", justify="right")
    table.add_column("agreement (%)", justify="right")
    for i, r in enumerate(rows):
        baseline_row = i == 0 and r.get("accuracy_delta_pt") is None and r.get("agreement") is None
        size, flops, agreement = r.get("size_bytes"), r.get("flops"), r.get("agreement")
        table.add_row(
            str(r.get("variant", "")),
            str(r.get("runtime") or ""),
            _number(None if size is None else size / size_factor, 2 if size_factor > 1 else 0),
            _gain(r.get("size_reduction_x"), baseline_row),
            _number(r.get("size_pct_of_baseline"), 1),
            _number(None if flops is None else flops / flop_factor, 2 if flop_factor > 1 else 0),
            _gain(r.get("compute_reduction_x"), baseline_row),
            _number(r.get("sparsity_pct"), 1),
            _number(r.get("latency_p50_ms"), 3),
            _gain(r.get("speedup_x"), baseline_row),
            _number(r.get("throughput_per_s"), 0),
            _gain(r.get("throughput_ratio_x"), baseline_row),
            _number(r.get("accuracy_pct"), 2),
            _delta(r.get("accuracy_delta_pt")),
            _number(None if agreement is None else 100.0 * agreement, 2),
        )
    return table
