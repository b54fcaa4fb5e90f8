"""The PromQL expressions and Grafana JSON builders the dashboards are made of: queries, panels and their grid, variables."""

from __future__ import annotations

from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


# ---------------------------------------------------------------------------------- PromQL


def rate(metric: str, sel: str, by: str, window: str = RATE) -> str:
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{window}]))"


def quantile(q: float, metric: str, sel: str, by: str, window: str = RATE) -> str:
    keys = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({keys}) (rate({metric}_bucket{{{sel}}}[{window}])))"


def error_ratio(sel: str, by: str, window: str = RATE) -> str:
    """Non-OK answers over all answers; `or ... * 0` shows 0, not a gap, while there is no error."""
    errors = rate("slimserve_requests_total", sel + ', code!="OK"', by, window)
    total = rate("slimserve_requests_total", sel, by, window)
    return f"({errors} or {total} * 0) / {total}"


def cost_per_1k(sel: str, by: str, window: str = RATE) -> str:
    return (
        f"1000 * {rate('slimserve_inference_cost_dollars_total', sel, by, window)} / {rate('slimserve_inferences_total', sel, by, window)}"
    )


def mean_batch(sel: str, by: str, window: str = RATE) -> str:
    return f"{rate('slimserve_batch_size_sum', sel, by, window)} / {rate('slimserve_batch_size_count', sel, by, window)}"


def shadow_agreement(sel: str, by: str, window: str = RATE) -> str:
    return f"{rate('slimserve_shadow_agreements_total', sel, by, window)} / {rate('slimserve_shadow_requests_total', sel, by, window)}"


# ---------------------------------------------------------------------------------- panels


class Layout:
    """Places panels left to right in rows of 24 grid units; `row()` starts a titled row."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.height = 0

    def _next_line(self) -> None:
        self.y += self.height
        self.x = 0
        self.height = 0

    def row(self, title: str) -> None:
        self._next_line()
        self.panels.append(
            {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}}
        )
        self.y += 1

    def add(self, panel: dict[str, Any], w: int = 8, h: int = 8) -> None:
        if self.x + w > 24:
            self._next_line()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.height = max(self.height, h)
        self.panels.append(panel)

    def numbered(self) -> list[dict[str, Any]]:
        for i, panel in enumerate(self.panels, start=1):
            panel["id"] = i
        return self.panels


def targets(*queries: tuple[str, str]) -> list[dict[str, Any]]:
    return [
        {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i), "range": True}
        for i, (expr, legend) in enumerate(queries)
    ]


def timeseries(title: str, description: str, unit: str, *queries: tuple[str, str], stack: bool = False, max_: float | None = None) -> dict:
    defaults: dict[str, Any] = {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}}
    if stack:
        defaults["custom"]["stacking"] = {"mode": "normal", "group": "A"}
    if max_ is not None:
        defaults["min"], defaults["max"] = 0, max_
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "lastNotNull"]},
            "tooltip": {"mode": "multi"},
        },
        "targets": targets(*queries),
    }


def stat(title: str, description: str, unit: str, *queries: tuple[str, str], kind: str = "stat", decimals: int | None = None) -> dict:
    defaults: dict[str, Any] = {"unit": unit}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [dict(t, instant=True, range=False) for t in targets(*queries)],
    }


def heatmap(title: str, description: str, expr: str) -> dict:
    """A heatmap of a histogram's buckets, as Prometheus exports them (no re-bucketing)."""
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1, "color": {"scheme": "Oranges", "mode": "scheme"}},
        "targets": [dict(t, format="heatmap") for t in targets((expr, "{{le}}"))],
    }


def table(title: str, description: str, *queries: tuple[str, str]) -> dict:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [{"id": "merge", "options": {}}],
        "targets": [dict(t, instant=True, range=False, format="table") for t in targets(*queries)],
    }


# ---------------------------------------------------------------------------------- variables


def datasource_variable() -> dict:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0}


def query_variable(name: str, label: str, query: str, multi: bool = False, include_all: bool = False, default: str | None = None) -> dict:
    variable: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-query"},
        "refresh": 2,  # on time range change: variants come and go
        "sort": 1,
        "multi": multi,
        "includeAll": include_all,
        "current": {},
        "hide": 0,
    }
    if include_all:
        variable["allValue"] = ".*"
    if default is not None:
        variable["current"] = {"selected": True, "text": default, "value": default}
    return variable


def dashboard(uid: str, title: str, description: str, variables: list[dict], panels: list[dict]) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["slimserve"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "links": [{"title": "slimserve dashboards", "type": "dashboards", "tags": ["slimserve"], "asDropdown": True}],
        "annotations": {"list": []},
        "templating": {"list": variables},
        "panels": panels,
    }
