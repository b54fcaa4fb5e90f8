"""The optimization report as a terminal table: one renderer for `slimctl optimize` and the offline `slimserve optimize`.

It reads the plain row dicts that slimserve.optimizer.report builds (and the server sends as JSON), so it needs
neither the optimizer nor torch: units go in the headers, gains in green and losses in red, columns
that no row fills are left out, and an auto search's table keeps only what decides between candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich import box
from rich.table import Table

_MISSING = "[dim]–[/dim]"
_SIZE_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "B"))
_FLOP_UNITS = ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs"), (1.0, "FLOPs"))
# Columns an auto search's table leaves out so that it fits a terminal; the JSON report has them all.
AUTO_HIDDEN = frozenset({"variant", "runtime", "size_reduction_x", "compute_reduction_x", "sparsity_pct", "throughput_per_s", "agreement"})


def _scale(values: list[Any], units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
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


def _flag(value: bool | None) -> str:
    return _MISSING if value is None else ("✓" if value else "")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _search_caption(rows: list[dict[str, Any]]) -> str:
    """What an auto search adds to the caption: its reference, the quality metric, how many evaluations and how long."""
    parts = []
    if any(r.get("reference_speedup_x") is not None for r in rows):
        parts.append("vs FP32 ×: p50 of the best FP32 runtime / variant p50 (timed in turns for the candidates that decided)")
    if any(r.get("quality_drop_pt") is not None for r in rows):
        parts.append("Δ quality: points of the metric against the baseline, the budget's unit")
    head = next((r for r in rows if r.get("search_evaluations") is not None), None)
    if head is not None:
        parts.append(
            f"reference: {head.get('reference')} on {head.get('reference_runtime')} at {head.get('reference_p50_ms')} ms · "
            f"search: {head['search_evaluations']} evaluations, {head.get('search_timings', 0)} timings in turns, "
            f"{head.get('search_seconds')} s"
        )
        if head.get("node_cpu"):
            parts.append(f"timed on {head['node_cpu']} (INT8: {head.get('node_int8_kernels')})")
        if head.get("dynamic_sequence"):
            parts.append(f"sequence: {head['dynamic_sequence']}")
    held = next((r for r in rows if r.get("budget_setting")), None)
    if held is not None:  # a budget search: what it kept and what finding it cost
        over = " (over budget, kept on request)" if held.get("within_budget") is False else ""
        parts.append(
            f"budget {held.get('budget_pt')} pt: {held['budget_setting']}{over}, "
            f"{held.get('budget_evaluations')} evaluations in {held.get('budget_search_s')} s"
        )
    return "".join(f" · {p}" for p in parts)


def render_report(rows: list[dict[str, Any]], title: str) -> Table:
    """The rows as a rich table: one row per variant (or auto candidate), the baseline first."""
    size_factor, size_unit = _scale([r.get("size_bytes") for r in rows], _SIZE_UNITS)
    flop_factor, flop_unit = _scale([r.get("flops") for r in rows], _FLOP_UNITS)

    def scaled(key: str, factor: float) -> Callable[[dict[str, Any], bool], str]:
        return lambda r, _: _number(None if r.get(key) is None else r[key] / factor, 2 if factor > 1 else 0)

    def number(key: str, digits: int, factor: float = 1.0) -> Callable[[dict[str, Any], bool], str]:
        return lambda r, _: _number(None if r.get(key) is None else r[key] * factor, digits)

    def gain(key: str) -> Callable[[dict[str, Any], bool], str]:
        return lambda r, baseline_row: _gain(r.get(key), baseline_row)

    # key -> (header, cell); the order is the table's. Headers stay short (the caption explains them), and
    # size_pct_of_baseline and throughput_ratio_x stay in the JSON only, so that the table fits 160 columns.
    columns: dict[str, tuple[str, Callable[[dict[str, Any], bool], str]]] = {
        "variant": ("variant", lambda r, _: _text(r.get("variant"))),
        "recipe": ("recipe", lambda r, _: _text(r.get("recipe"))),  # the auto search's candidates
        "status": ("status", lambda r, _: _text(r.get("status"))),
        "runtime": ("runtime", lambda r, _: _text(r.get("runtime"))),
        "size_bytes": (f"size ({size_unit})", scaled("size_bytes", size_factor)),
        "size_reduction_x": ("smaller ×", gain("size_reduction_x")),
        "flops": (flop_unit, scaled("flops", flop_factor)),
        "compute_reduction_x": ("compute ×", gain("compute_reduction_x")),
        "sparsity_pct": ("sparsity %", number("sparsity_pct", 1)),
        "latency_p50_ms": ("p50 ms", number("latency_p50_ms", 3)),
        "speedup_x": ("speed-up ×", gain("speedup_x")),
        "throughput_per_s": ("samples/s", number("throughput_per_s", 0)),
        "accuracy_pct": ("accuracy %", number("accuracy_pct", 2)),
        "accuracy_delta_pt": ("Δ pts", lambda r, _: _delta(r.get("accuracy_delta_pt"))),
        "agreement": ("agree %", number("agreement", 2, 100.0)),
        "metric": ("metric", lambda r, _: _text(r.get("metric"))),  # what the budget holds
        "quality": ("quality", lambda r, _: _number(r.get("quality"), 4)),
        "quality_drop_pt": ("Δ quality", lambda r, _: _delta(None if r.get("quality_drop_pt") is None else 0.0 - r["quality_drop_pt"])),
        "reference_speedup_x": ("vs FP32 ×", gain("reference_speedup_x")),
        "within_budget": ("in budget", lambda r, _: _flag(r.get("within_budget"))),
        "pareto": ("Pareto", lambda r, _: _flag(r.get("pareto"))),
        "chosen": ("chosen", lambda r, _: _flag(r.get("chosen"))),
    }
    keys = [k for k in columns if any(r.get(k) not in (None, "") for r in rows)]
    if all(r.get("metric") in (None, "accuracy") for r in rows):  # accuracy % and Δ pts say it already
        keys = [k for k in keys if k not in ("quality", "quality_drop_pt")]
    if any("chosen" in r for r in rows):  # the auto search's table: one row per candidate, what decides only
        keys = [k for k in keys if k not in AUTO_HIDDEN]
    table = Table(
        title=title,
        caption="FLOPs per sample · p50 latency at batch 1 · speed-up: baseline p50 / variant p50 · Δ pts: accuracy points "
        "against the baseline · agree: share of top-1 answers equal to the baseline's (cosine similarity for embeddings)"
        + _search_caption(rows),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for k in keys:
        # Numbers never wrap; names and statuses (a failed candidate's message) take the width that is left.
        text = k in ("variant", "recipe", "status", "runtime")
        table.add_column(
            columns[k][0],
            justify="left" if text else "right",
            no_wrap=not text,
            overflow="fold" if text else "ellipsis",
            style="bold" if k in ("variant", "recipe") else "",
        )
    for i, r in enumerate(rows):
        first = i == 0 and r.get("accuracy_delta_pt") is None and r.get("agreement") is None
        baseline_row = r.get("status") == "baseline" or first
        table.add_row(*(columns[k][1](r, baseline_row) for k in keys))
    return table
