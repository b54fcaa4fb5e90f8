"""The optimization report: one row per variant against the baseline (size, compute, latency, throughput, accuracy).

Rows are plain dicts whose keys carry their units (`latency_p50_ms`, `speedup_x`, `accuracy_delta_pt`), so
that they read well both as JSON and as column headers; slimserve.client.report renders them for a terminal.
"""

from __future__ import annotations

import json
import math
from typing import Any

from slimserve.optimizer.evaluation.measure import Evaluation

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
    "speedup_x",  # baseline ms / variant ms at batch 1, timed in turns in the same job (else the ratio of the p50s)
    "speedup_ci",  # the 95% interval of speedup_x [low, high] (timed in turns), None where it was not
    "threads",  # intra-op threads of the session timed (the serving runtime's choice)
    "throughput_per_s",  # samples / s at the serving batch
    "throughput_ratio_x",  # variant / baseline
    "accuracy_pct",
    "accuracy_delta_pt",  # percentage points against the baseline
    "agreement",  # top-1 agreement with the baseline (or cosine similarity), 0-1
    "metric",  # the quality metric the budget holds: accuracy | top1-agreement | cosine | relative-error
    "quality",  # its value: accuracy / agreement / mean cosine in 0-1, relative error (0: equal)
    "quality_min",  # the lowest per-sample cosine similarity (cosine only)
    "quality_drop_pt",  # points lost against the baseline in the budget's unit (optimizer.quality)
    "quality_output",  # the output (or evaluator:NAME) the metric / quality / drop above are of: the worst for a variant
    "quality_by_output",  # every output and the evaluator: [{output, metric, value, drop_pt, worst}], in the model's order
    "reference_speedup_x",  # best FP32 runtime's p50 / variant p50, batch 1 (the reference an auto search must beat)
    "budget_pt",  # the accuracy budget the variant was held to (the tightest of the job's and its passes' max_drop)
    "within_budget",  # whether it met it (False only for a variant kept over budget on request)
    "budget_setting",  # what the budget search chose, e.g. "prune-structured pruning_ratio=0.45"
    "budget_evaluations",  # quality evaluations the budget search took (probes and final runs)
    "budget_search_s",  # seconds the passes held to the budget took, search included
    "budget_probes",  # every setting probed and its drop, e.g. "0.8: 4.50 pt, 0.2: 0.00 pt, 0.5: failed"
)


BUDGET_COLUMNS = COLUMNS[COLUMNS.index("budget_pt") :]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or not math.isfinite(numerator / denominator):
        return None
    return numerator / denominator


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def report_rows(
    evaluations: dict[str, Evaluation],
    baseline: str = "baseline",
    reference: tuple[str, Evaluation] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per variant, the baseline first; ratios are None where the baseline or the variant lacks the measure.

    `reference`: the model's best FP32 runtime (name, evaluation), for reference_speedup_x; None leaves it out.
    `extra`: per variant, values of the budget columns (slimserve.optimizer.search.budget.budget_columns); the others stay None.
    """
    base = evaluations.get(baseline)
    ref = None if reference is None else reference[1]
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
        rows.append(
            {
                "variant": name,
                "runtime": e.runtime,
                "size_bytes": e.size_bytes,
                "size_reduction_x": _round(_ratio(b.size_bytes, e.size_bytes), 3),
                "size_pct_of_baseline": _round(None if size_fraction is None else 100.0 * size_fraction, 2),
                "flops": e.flops,
                "compute_reduction_x": _round(_ratio(b.flops, e.flops), 3),
                "sparsity_pct": _round(sparsity, 2),
                "latency_p50_ms": _round(e.latency_p50_ms, 4),
                "speedup_x": _round(e.speedup_x, 3) if e.speedup_x is not None else _round(_ratio(b.latency_p50_ms, e.latency_p50_ms), 3),
                "speedup_ci": None if e.speedup_ci is None else [_round(v, 3) for v in e.speedup_ci],
                "threads": e.threads,
                "throughput_per_s": _round(e.throughput, 1),
                "throughput_ratio_x": _round(_ratio(e.throughput, b.throughput), 3),
                "accuracy_pct": _round(None if e.accuracy is None else 100.0 * e.accuracy, 2),
                "accuracy_delta_pt": None if name == baseline else _round(accuracy_delta, 2),
                "agreement": None if name == baseline else _round(e.agreement, 4),
                "metric": e.quality_metric,
                "quality": _round(e.quality, 4),
                "quality_min": None if name == baseline else _round(e.quality_min, 4),
                "quality_drop_pt": None if name == baseline else _round(e.quality_drop, 2),
                "quality_output": e.quality_output,
                "quality_by_output": by_output(e.qualities, name == baseline),
                "reference_speedup_x": None if ref is None else _round(_ratio(ref.latency_p50_ms, e.latency_p50_ms), 3),
                **{k: (extra or {}).get(name, {}).get(k) for k in BUDGET_COLUMNS},
            }
        )
    return rows


def by_output(qualities: dict[str, dict[str, Any]] | None, baseline: bool) -> list[dict[str, Any]] | None:
    """The per-output rows of a report row: each output's metric, value and drop (none for the baseline itself)."""
    if not qualities:
        return None
    return [
        {
            "output": name,
            "metric": q.get("metric"),
            "value": _round(q.get("value"), 4),
            "drop_pt": None if baseline else _round(q.get("drop"), 2),
            "worst": None if baseline else _round(q.get("worst"), 4),
        }
        for name, q in qualities.items()
    ]


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, allow_nan=False)
