"""The optimization report as a terminal table: one renderer for `slimctl optimize` and the offline `slimserve optimize`;
and the pass catalog's tables, for `slimctl passes` and `slimserve passes`.

It reads the plain row dicts that slimserve.optimizer.report builds (and the server sends as JSON), so it needs
neither the optimizer nor torch: units go in the headers, gains in green and losses in red, columns
that no row fills are left out, and an auto search's table keeps only what decides between candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from slimserve.client.tables import Col, FitTable

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


def _per_output(rows: list[dict[str, Any]] | None) -> str:
    """'boxes -5.00 · scores +0.00': each output's (and the evaluator's) points against the baseline, losses in red."""
    parts = [
        f"{str(r.get('output')).removeprefix('evaluator:')} {_delta(None if r.get('drop_pt') is None else 0.0 - r['drop_pt'])}"
        for r in rows or ()
        if r.get("drop_pt") is not None
    ]
    return " · ".join(parts) if parts else _MISSING


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
    sequence = next((r["dynamic_sequence"] for r in rows if r.get("dynamic_sequence")), None)
    if sequence:
        parts.append(f"sequence: {sequence}")
    # A budget search: what it kept and what finding it cost. In an auto search's table only the chosen candidate was
    # kept (the others' settings are in their rows); elsewhere the one variant, kept over budget only when asked.
    auto = any("chosen" in r for r in rows)
    held = next((r for r in rows if r.get("budget_setting") and (r.get("chosen") or not auto)), None)
    if held is not None:
        over = ""
        if held.get("within_budget") is False:
            over = " (over budget: no candidate met it)" if auto else " (over budget, kept on request)"
        parts.append(
            f"budget {held.get('budget_pt')} pt: {held['budget_setting']}{over}, "
            f"{held.get('budget_evaluations')} evaluations in {held.get('budget_search_s')} s"
        )
    return "".join(f" · {p}" for p in parts)


def render_report(rows: list[dict[str, Any]], title: str, width: int = 160, wide: bool = False) -> Table:
    """The rows as a rich table: one row per variant (or auto candidate), the baseline first.

    At `width` columns the variant (or an auto candidate's recipe) stays whole and the columns of least weight for a
    decision go first (client/tables.py); `wide` keeps every column, the auto search's extra ones too.
    """
    size_factor, size_unit = _scale([r.get("size_bytes") for r in rows], _SIZE_UNITS)
    flop_factor, flop_unit = _scale([r.get("flops") for r in rows], _FLOP_UNITS)

    def scaled(key: str, factor: float) -> Callable[[dict[str, Any], bool], str]:
        return lambda r, _: _number(None if r.get(key) is None else r[key] / factor, 2 if factor > 1 else 0)

    def number(key: str, digits: int, factor: float = 1.0) -> Callable[[dict[str, Any], bool], str]:
        return lambda r, _: _number(None if r.get(key) is None else r[key] * factor, digits)

    def gain(key: str) -> Callable[[dict[str, Any], bool], str]:
        return lambda r, baseline_row: _gain(r.get(key), baseline_row)

    # key -> (header, rank, cell); the order is the table's, the rank the order in which a narrow terminal drops
    # columns (highest first; 0 never). Headers stay short (the caption explains them); size_pct_of_baseline and
    # throughput_ratio_x stay in the JSON only.
    columns: dict[str, tuple[str, int, Callable[[dict[str, Any], bool], str]]] = {
        "variant": ("variant", 0, lambda r, _: _text(r.get("variant"))),
        "recipe": ("recipe", 0, lambda r, _: _text(r.get("recipe"))),  # the auto search's candidates
        "status": ("status", 2, lambda r, _: _text(r.get("status"))),
        "runtime": ("runtime", 6, lambda r, _: _text(r.get("runtime"))),
        "threads": ("threads", 7, lambda r, _: _text(r.get("threads"))),  # the intra-op count timed, kept per model file
        "size_bytes": (f"size ({size_unit})", 2, scaled("size_bytes", size_factor)),
        "size_reduction_x": ("smaller ×", 4, gain("size_reduction_x")),
        "flops": (flop_unit, 5, scaled("flops", flop_factor)),
        "compute_reduction_x": ("compute ×", 6, gain("compute_reduction_x")),
        "sparsity_pct": ("sparsity %", 7, number("sparsity_pct", 1)),
        "latency_p50_ms": ("p50 ms", 3, number("latency_p50_ms", 3)),
        "speedup_x": ("speed-up ×", 1, gain("speedup_x")),
        "throughput_per_s": ("samples/s", 7, number("throughput_per_s", 0)),
        "accuracy_pct": ("accuracy %", 3, number("accuracy_pct", 2)),
        "accuracy_delta_pt": ("Δ pts", 1, lambda r, _: _delta(r.get("accuracy_delta_pt"))),
        "agreement": ("agree %", 5, number("agreement", 2, 100.0)),
        "metric": ("metric", 6, lambda r, _: _text(r.get("metric"))),  # what the budget holds
        "quality": ("quality", 4, lambda r, _: _number(r.get("quality"), 4)),
        "quality_drop_pt": ("Δ quality", 1, lambda r, _: _delta(None if r.get("quality_drop_pt") is None else 0.0 - r["quality_drop_pt"])),
        "quality_by_output": ("Δ per output", 3, lambda r, _: _per_output(r.get("quality_by_output"))),
        "reference_speedup_x": ("vs FP32 ×", 3, gain("reference_speedup_x")),
        "within_budget": ("in budget", 2, lambda r, _: _flag(r.get("within_budget"))),
        "pareto": ("Pareto", 4, lambda r, _: _flag(r.get("pareto"))),
        "chosen": ("chosen", 1, lambda r, _: _flag(r.get("chosen"))),
    }
    keys = [k for k in columns if any(r.get(k) not in (None, "") for r in rows)]
    if all(len(r.get("quality_by_output") or ()) < 2 for r in rows):  # one output: the quality columns say it all
        keys = [k for k in keys if k != "quality_by_output"]
    if all(r.get("metric") in (None, "accuracy") for r in rows):  # accuracy % and Δ pts say it already
        keys = [k for k in keys if k not in ("quality", "quality_drop_pt")]
    if any("chosen" in r for r in rows) and not wide:  # the auto search's table: one row per candidate, what decides only
        keys = [k for k in keys if k not in AUTO_HIDDEN]
    table = FitTable(
        [
            Col(
                columns[k][0],
                rank=columns[k][1],
                # Numbers and names never wrap; a status (a failed candidate's message) takes the width that is left.
                justify="left" if k in ("variant", "recipe", "status", "runtime", "quality_by_output") else "right",
                wraps=k in ("status", "quality_by_output"),
                style="bold" if k in ("variant", "recipe") else "",
            )
            for k in keys
        ],
        title=title,
        caption="FLOPs per sample · p50 latency at batch 1 · speed-up: baseline / variant latency at batch 1, timed in turns in the "
        "job where the JSON has speedup_ci (else the p50s) · Δ pts: accuracy points "
        "against the baseline · agree: share of top-1 answers equal to the baseline's (cosine similarity for embeddings)"
        + _search_caption(rows),
        box=box.SIMPLE_HEAD,
    )
    for i, r in enumerate(rows):
        first = i == 0 and r.get("accuracy_delta_pt") is None and r.get("agreement") is None
        baseline_row = r.get("status") == "baseline" or first
        table.add_row(*(columns[k][2](r, baseline_row) for k in keys))
    return table.render(width, wide)


def render_passes(passes: list[dict[str, Any]]) -> Table:
    """Every pass (records.pass_dict): name, kind, what it needs besides the model, what it does."""
    table = Table("pass", "kind", "needs", "what it does", box=box.SIMPLE_HEAD, title="optimizer passes (`passes NAME` shows the settings)")
    for p in passes:
        table.add_row(*(escape(c) for c in (p["name"], p["kind"], "\n".join(p["needs"]) or "-", p["description"])))
    return table


def render_pass_settings(p: dict[str, Any]) -> Table:
    """One pass's settings: the recipe key, its type, its default as a recipe writes it, and what it does."""
    needs = "; ".join(p["needs"]) or "nothing besides the model"
    title = escape(f"{p['name']} ({p['kind']}): {p['description']}\nneeds: {needs}")
    table = Table("setting", "type", "default", "description", box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for s in p["settings"]:
        table.add_row(*(escape(s[k]) for k in ("name", "type", "default", "description")))
    return table
