"""The fleet dashboard: every model on every replica, by node type."""

from __future__ import annotations

from dashboards.builders import (
    RATE,
    Layout,
    cost_per_1k,
    dashboard,
    datasource_variable,
    error_ratio,
    quantile,
    query_variable,
    rate,
    stat,
    table,
    timeseries,
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

    grid.row("Optimizer jobs beside traffic")
    grid.add(
        timeseries(
            "Job workers held for traffic",
            "Seconds per second the job yield (--job-yield) held optimizer job workers stopped while serving was busy, "
            "by model and recipe: a job that runs beside heavy traffic goes this much slower.",
            "percentunit",
            (rate("slimserve_job_paused_seconds_total", sel, "model, recipe"), "{{model}} {{recipe}}"),
        )
    )
    grid.add(
        timeseries(
            "Job yield run fraction",
            "The fraction of the time a local job worker runs now (1: serving is not busy, or no job runs), by node type.",
            "percentunit",
            ("max by (node_type) (slimserve_job_yield_run_ratio{" + sel + "})", "{{node_type}}"),
            max_=1,
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
