"""Generates the Grafana dashboards and the Kubernetes PrometheusRule from one place.

Run `python deploy/generate.py` after editing this file or deploy/prometheus/rules/*.yml;
tests/deploy fails while the committed files differ from what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
RULES = DEPLOY / "prometheus" / "rules"
PROMETHEUS_RULE = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

# Selectors of the per-model dashboard: the model, the chosen variants, the chosen node types.
SEL = 'model="$model", variant=~"$variant", node_type=~"$node_type"'
SEL_A = 'model="$model", variant="$variant_a", node_type=~"$node_type"'
SEL_B = 'model="$model", variant="$variant_b", node_type=~"$node_type"'


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


# ---------------------------------------------------------------------------------- dashboards


def model_dashboard() -> dict:
    """Per model and variant: traffic, latency, batching, cost, quality, and an A/B row."""
    grid = Layout()
    grid.row("Traffic")
    grid.add(
        timeseries(
            "Request rate",
            "Inference requests answered per second, by variant.",
            "reqps",
            (rate("slimserve_requests_total", SEL, "variant"), "{{variant}}"),
        )
    )
    grid.add(
        timeseries(
            "Error ratio",
            "Share of requests answered with a non-OK status (client and server errors).",
            "percentunit",
            (error_ratio(SEL, "variant"), "{{variant}}"),
        )
    )
    grid.add(
        timeseries(
            "Errors by status code",
            "Non-OK answers per second, by variant and gRPC status code.",
            "reqps",
            (rate("slimserve_requests_total", SEL + ', code!="OK"', "variant, code"), "{{variant}} {{code}}"),
            stack=True,
        )
    )
    grid.add(
        timeseries(
            "Traffic weights",
            "Share of the model's traffic the router sends to each variant.",
            "percentunit",
            ("max by (variant) (slimserve_traffic_weight_ratio{" + SEL + "})", "{{variant}}"),
            stack=True,
            max_=1,
        )
    )
    grid.add(
        timeseries(
            "Inferences per second",
            "Samples inferred per second (a request can carry several).",
            "short",
            (rate("slimserve_inferences_total", SEL, "variant"), "{{variant}}"),
        )
    )
    grid.add(
        timeseries(
            "In flight",
            "Requests being processed right now, summed over replicas.",
            "short",
            ("sum by (variant) (slimserve_inflight_requests{" + SEL + "})", "{{variant}}"),
        )
    )

    grid.row("Latency and batching")
    grid.add(
        timeseries(
            "Request latency p50 / p99",
            "From receiving a request to answering it, from the request histogram.",
            "s",
            (quantile(0.5, "slimserve_request_duration_seconds", SEL, "variant"), "{{variant}} p50"),
            (quantile(0.99, "slimserve_request_duration_seconds", SEL, "variant"), "{{variant}} p99"),
        )
    )
    grid.add(
        timeseries(
            "Queue time p50 / p99",
            "Time a request waits in the dynamic batcher's queue before its batch starts.",
            "s",
            (quantile(0.5, "slimserve_queue_duration_seconds", SEL, "variant"), "{{variant}} p50"),
            (quantile(0.99, "slimserve_queue_duration_seconds", SEL, "variant"), "{{variant}} p99"),
        )
    )
    grid.add(
        timeseries(
            "Queue depth",
            "Requests waiting in each variant's batcher queue, against the queue's capacity.",
            "short",
            ("sum by (variant) (slimserve_queue_requests{" + SEL + "})", "{{variant}} waiting"),
            ("max by (variant) (slimserve_queue_capacity_requests{" + SEL + "})", "{{variant}} capacity"),
        )
    )
    grid.add(
        timeseries(
            "Compute time p50 / p99",
            "Time the runtime spends on one model call (one batch).",
            "s",
            (quantile(0.5, "slimserve_compute_duration_seconds", SEL, "variant"), "{{variant}} p50"),
            (quantile(0.99, "slimserve_compute_duration_seconds", SEL, "variant"), "{{variant}} p99"),
        )
    )
    grid.add(
        timeseries(
            "Batch size",
            "Samples per executed model call: the mean, and the 90th percentile from the histogram.",
            "short",
            (mean_batch(SEL, "variant"), "{{variant}} mean"),
            (quantile(0.9, "slimserve_batch_size", SEL, "variant"), "{{variant}} p90"),
        ),
        w=12,
    )
    grid.add(
        heatmap(
            "Request latency distribution",
            "Requests per second in each bucket of the request duration histogram.",
            "sum by (le) (rate(slimserve_request_duration_seconds_bucket{" + SEL + "}[" + RATE + "]))",
        ),
        w=12,
    )

    grid.row("Cost")
    grid.add(
        timeseries(
            "Cost per 1000 inferences",
            "Dollars of device time per 1000 samples: compute seconds × the node's price per hour.",
            "currencyUSD",
            (cost_per_1k(SEL, "variant"), "{{variant}}"),
        )
    )
    grid.add(
        timeseries(
            "Compute cost per hour by node type",
            "Dollars per hour of busy device time of this model, by node type.",
            "currencyUSD",
            (
                "3600 * " + rate("slimserve_inference_cost_dollars_total", 'model="$model", node_type=~"$node_type"', "node_type"),
                "{{node_type}}",
            ),
        )
    )
    grid.add(
        stat(
            "Spent in the time range",
            "Dollars of device time spent by each variant in the dashboard's time range.",
            "currencyUSD",
            ("sum by (variant) (increase(slimserve_inference_cost_dollars_total{" + SEL + "}[$__range]))", "{{variant}}"),
            decimals=4,
        )
    )

    grid.row("Quality and size")
    grid.add(
        stat(
            "Offline accuracy",
            "Top-1 accuracy of each variant on the model's evaluation data.",
            "percentunit",
            ("max by (variant) (slimserve_offline_accuracy_ratio{" + SEL + "})", "{{variant}}"),
            kind="bargauge",
            decimals=2,
        )
    )
    grid.add(
        timeseries(
            "Online accuracy",
            "Top-1 accuracy on live traffic that received feedback (slimctl feedback).",
            "percentunit",
            ("max by (variant) (slimserve_online_accuracy_ratio{" + SEL + "})", "{{variant}}"),
        )
    )
    grid.add(
        timeseries(
            "Feedback received",
            "Ground-truth labels per second, by whether the answer was right.",
            "short",
            (rate("slimserve_feedback_total", SEL, "variant, correct"), "{{variant}} correct={{correct}}"),
            stack=True,
        )
    )
    grid.add(
        timeseries(
            "Shadow agreement",
            "Share of mirrored requests whose shadow answer had the primary's top-1 class.",
            "percentunit",
            (shadow_agreement(SEL, "variant"), "{{variant}}"),
            max_=1,
        )
    )
    grid.add(
        stat(
            "Model size",
            "Bytes on disk of each loaded variant.",
            "bytes",
            ("max by (variant) (slimserve_model_size_bytes{" + SEL + "})", "{{variant}}"),
            kind="bargauge",
        )
    )
    grid.add(
        stat(
            "FLOPs per sample",
            "Floating-point operations per sample of each variant.",
            "short",
            ("max by (variant) (slimserve_model_flops{" + SEL + "})", "{{variant}}"),
            kind="bargauge",
        )
    )

    grid.row("A/B: $variant_a vs $variant_b")
    ab = (("A", SEL_A, "$variant_a"), ("B", SEL_B, "$variant_b"))
    grid.add(
        timeseries(
            "A/B request rate",
            "Requests per second of the two variants.",
            "reqps",
            *[(rate("slimserve_requests_total", s, "variant"), f"{k}: {{{{variant}}}}") for k, s, _ in ab],
        )
    )
    grid.add(
        timeseries(
            "A/B p99 latency",
            "99th percentile of request duration of the two variants.",
            "s",
            *[(quantile(0.99, "slimserve_request_duration_seconds", s, "variant"), f"{k}: {{{{variant}}}}") for k, s, _ in ab],
        )
    )
    grid.add(
        timeseries(
            "A/B error ratio",
            "Share of non-OK answers of the two variants.",
            "percentunit",
            *[(error_ratio(s, "variant"), f"{k}: {{{{variant}}}}") for k, s, _ in ab],
        )
    )
    grid.add(
        timeseries(
            "A/B cost per 1000 inferences",
            "Dollars per 1000 samples of the two variants.",
            "currencyUSD",
            *[(cost_per_1k(s, "variant"), f"{k}: {{{{variant}}}}") for k, s, _ in ab],
        )
    )
    grid.add(
        timeseries(
            "A/B online accuracy",
            "Online accuracy (from feedback) of the two variants.",
            "percentunit",
            *[("max by (variant) (slimserve_online_accuracy_ratio{" + s + "})", f"{k}: {{{{variant}}}}") for k, s, _ in ab],
        )
    )
    grid.add(
        timeseries(
            "A/B mean batch size",
            "Samples per model call of the two variants.",
            "short",
            *[(mean_batch(s, "variant"), f"{k}: {{{{variant}}}}") for k, s, _ in ab],
        )
    )
    grid.add(
        stat(
            "p99 latency B / A",
            "Over the time range: below 1 means $variant_b answers faster than $variant_a.",
            "percentunit",
            (
                f"{quantile(0.99, 'slimserve_request_duration_seconds', SEL_B, '', '$__range')} / "
                f"{quantile(0.99, 'slimserve_request_duration_seconds', SEL_A, '', '$__range')}",
                "B / A",
            ),
            decimals=1,
        ),
        w=6,
        h=5,
    )
    grid.add(
        stat(
            "Cost per 1000 B / A",
            "Over the time range: below 1 means $variant_b is cheaper than $variant_a.",
            "percentunit",
            (f"{cost_per_1k(SEL_B, 'model', '$__range')} / {cost_per_1k(SEL_A, 'model', '$__range')}", "B / A"),
            decimals=1,
        ),
        w=6,
        h=5,
    )
    grid.add(
        stat(
            "Offline accuracy B − A",
            "Percentage points of offline accuracy $variant_b gains (or loses) against $variant_a.",
            "short",
            (
                "100 * (max by (model) (slimserve_offline_accuracy_ratio{"
                + SEL_B
                + "}) - max by (model) (slimserve_offline_accuracy_ratio{"
                + SEL_A
                + "}))",
                "points",
            ),
            decimals=2,
        ),
        w=6,
        h=5,
    )
    grid.add(
        stat(
            "Requests in range A / B",
            "Requests each variant answered in the time range: the sample behind the comparison.",
            "short",
            *[("sum(increase(slimserve_requests_total{" + s + "}[$__range]))", k) for k, s, _ in ab],
            decimals=0,
        ),
        w=6,
        h=5,
    )

    variables = [
        datasource_variable(),
        query_variable(
            "node_type", "Node type", "label_values(slimserve_node_price_dollars_per_hour, node_type)", multi=True, include_all=True
        ),
        query_variable("model", "Model", "label_values(slimserve_variant_loaded, model)"),
        query_variable(
            "variant", "Variants", 'label_values(slimserve_variant_loaded{model="$model"}, variant)', multi=True, include_all=True
        ),
        query_variable(
            "variant_a", "A/B: variant A", 'label_values(slimserve_variant_loaded{model="$model"}, variant)', default="baseline"
        ),
        query_variable("variant_b", "A/B: variant B", 'label_values(slimserve_variant_loaded{model="$model"}, variant)'),
    ]
    return dashboard(
        "slimserve-model",
        "slimserve / model and variants",
        "One model's variants side by side: traffic, latency, batching, cost, accuracy, shadow agreement, and an A/B comparison.",
        variables,
        grid.numbered(),
    )


def fleet_dashboard() -> dict:
    """All models on all replicas: health, load, latency and what it costs, by node type."""
    grid = Layout()
    sel = 'node_type=~"$node_type"'
    grid.row("Fleet")
    grid.add(
        stat(
            "Replicas",
            "slimserve processes Prometheus scrapes, by node type.",
            "short",
            ("count by (node_type) (slimserve_node_price_dollars_per_hour{" + sel + "})", "{{node_type}}"),
        ),
        w=6,
        h=5,
    )
    grid.add(
        stat(
            "Requests per second",
            "All models, all variants.",
            "reqps",
            ("sum(rate(slimserve_requests_total{" + sel + "}[" + RATE + "]))", "total"),
        ),
        w=6,
        h=5,
    )
    grid.add(
        stat(
            "Replica cost per hour",
            "What the running replicas cost per hour, busy or idle (each exports its node's price).",
            "currencyUSD",
            ("sum(slimserve_node_price_dollars_per_hour{" + sel + "})", "total"),
            decimals=2,
        ),
        w=6,
        h=5,
    )
    grid.add(
        stat(
            "Firing alerts",
            "slimserve alerts firing now (Prometheus' ALERTS series).",
            "short",
            ('count(ALERTS{alertname=~"Slimserve.*", alertstate="firing"}) or vector(0)', "firing"),
        ),
        w=6,
        h=5,
    )

    grid.row("Load and latency by model")
    grid.add(
        timeseries(
            "Request rate by model",
            "Inference requests per second, by model.",
            "reqps",
            (rate("slimserve_requests_total", sel, "model"), "{{model}}"),
        )
    )
    grid.add(
        timeseries("Error ratio by model", "Share of non-OK answers, by model.", "percentunit", (error_ratio(sel, "model"), "{{model}}"))
    )
    grid.add(
        timeseries(
            "p99 latency by model",
            "99th percentile of request duration, by model.",
            "s",
            (quantile(0.99, "slimserve_request_duration_seconds", sel, "model"), "{{model}}"),
        )
    )

    grid.row("Cost by node type")
    grid.add(
        timeseries(
            "Compute cost per hour by node type",
            "Dollars per hour of busy device time, by node type.",
            "currencyUSD",
            ("3600 * " + rate("slimserve_inference_cost_dollars_total", sel, "node_type"), "{{node_type}}"),
        )
    )
    grid.add(
        timeseries(
            "Replica cost per hour by node type",
            "Sum of the node prices of the running replicas, by node type.",
            "currencyUSD",
            ("sum by (node_type) (slimserve_node_price_dollars_per_hour{" + sel + "})", "{{node_type}}"),
            stack=True,
        )
    )
    grid.add(
        timeseries(
            "Cost per 1000 inferences by model",
            "Dollars of device time per 1000 samples, by model and node type.",
            "currencyUSD",
            (cost_per_1k(sel, "model, node_type"), "{{model}} on {{node_type}}"),
        )
    )

    grid.row("Variants")
    grid.add(
        table(
            "Loaded variants",
            "Every loaded variant with its traffic weight, offline accuracy and size.",
            ("max by (model, variant, node_type) (slimserve_variant_loaded{" + sel + "})", "loaded"),
            ("max by (model, variant, node_type) (slimserve_traffic_weight_ratio{" + sel + "})", "weight"),
            ("max by (model, variant, node_type) (slimserve_offline_accuracy_ratio{" + sel + "})", "offline accuracy"),
            ("max by (model, variant, node_type) (slimserve_model_size_bytes{" + sel + "})", "bytes"),
        ),
        w=24,
        h=9,
    )

    variables = [
        datasource_variable(),
        query_variable(
            "node_type", "Node type", "label_values(slimserve_node_price_dollars_per_hour, node_type)", multi=True, include_all=True
        ),
    ]
    return dashboard(
        "slimserve-fleet",
        "slimserve / fleet",
        "Every model on every replica: load, errors, latency, and cost by node type.",
        variables,
        grid.numbered(),
    )


# ---------------------------------------------------------------------------------- outputs


def prometheus_rule() -> str:
    groups = []
    for path in sorted(RULES.glob("*.yml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "slimserve", "labels": {"app.kubernetes.io/name": "slimserve", "app.kubernetes.io/component": "monitoring"}},
        "spec": {"groups": groups},
    }
    header = "# Generated by deploy/generate.py from deploy/prometheus/rules/*.yml: edit those, then run it.\n"
    return header + yaml.safe_dump(resource, sort_keys=False, width=200)


def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {
        DASHBOARDS / "slimserve-model.json": model_dashboard(),
        DASHBOARDS / "slimserve-fleet.json": fleet_dashboard(),
    }
    rendered = {path: json.dumps(content, indent=2, ensure_ascii=False) + "\n" for path, content in files.items()}
    rendered[PROMETHEUS_RULE] = prometheus_rule()
    return rendered


def main() -> int:
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(DEPLOY.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
