"""Reads the metric and label names out of PromQL expressions (ours: dashboards and rules), without a parser.

Enough for the expressions under deploy/: selectors, `by (...)`, `on (...)`, functions, ranges.
Prometheus itself (promtool and a live server) checks their syntax in test_prometheus.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Values that Grafana puts in place of its variables when it sends a query.
GRAFANA_VALUES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$node_type": ".*",
    "$variant_a": "baseline",
    "$variant_b": "baseline",
    "$variant": ".*",
}

KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_MATCHER = re.compile(r"\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*")


def substitute(expr: str, model: str) -> str:
    """The query Grafana would send for `model` (longest variable names first)."""
    for name, value in sorted({**GRAFANA_VALUES, "$model": model}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


@dataclass
class Usage:
    """Metric names an expression reads, and the label names it relies on for each."""

    metrics: set[str] = field(default_factory=set)
    labels: dict[str, set[str]] = field(default_factory=dict)  # metric -> labels in its selector
    grouping: set[str] = field(default_factory=set)  # labels in by/on/... anywhere in the expression


def usage(expr: str) -> Usage:
    found = Usage()
    # Label matchers first, while the strings they compare with are still there.
    selectors: dict[int, set[str]] = {}
    for m in _SELECTOR.finditer(expr):
        body = _STRING.sub('""', m.group(1))
        selectors[m.start()] = {lm.group(1) for part in body.split(",") if part.strip() for lm in [_MATCHER.match(part)] if lm}
    text = _STRING.sub('""', expr)
    for m in _GROUPING.finditer(text):
        found.grouping |= {label.strip() for label in m.group(2).split(",") if label.strip()}
    # Blank out groupings, selectors and ranges (same length, so selector offsets still line up).
    blank = lambda m: " " * len(m.group(0))  # noqa: E731
    text = _GROUPING.sub(blank, text)
    stripped = _RANGE.sub(blank, _SELECTOR.sub(lambda m: "{" + " " * (len(m.group(0)) - 2) + "}", text))
    for m in _IDENT.finditer(stripped):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        found.metrics.add(name)
        end = m.end(1)
        rest = stripped[end:]
        brace = end + (len(rest) - len(rest.lstrip()))
        found.labels.setdefault(name, set()).update(selectors.get(brace, set()))
    return found
