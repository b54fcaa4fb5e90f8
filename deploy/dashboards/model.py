"""The per-model dashboard: one model's variants side by side, and an A/B row."""

from __future__ import annotations

from dashboards.builders import (
    RATE,
    Layout,
    cost_per_1k,
    dashboard,
    datasource_variable,
    error_ratio,
    heatmap,
    mean_batch,
    quantile,
    query_variable,
    rate,
    shadow_agreement,
    stat,
    timeseries,
)
from dashboards.rollout import rollout_annotations, rollout_row

# Selectors of the per-model dashboard: the model, the chosen variants, the chosen node types.
SEL = 'model="$model", variant=~"$variant", node_type=~"$node_type"'
SEL_A = 'model="$model", variant="$variant_a", node_type=~"$node_type"'
SEL_B = 'model="$model", variant="$variant_b", node_type=~"$node_type"'


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
            "Dropped before compute",
            "Requests taken out of a batcher's queue before compute, per second: their deadline passed (answered "
            "DEADLINE_EXCEEDED) or their caller cancelled.",
            "reqps",
            ("sum by (variant, reason) (rate(slimserve_queue_dropped_total{" + SEL + "}[$__rate_interval]))", "{{variant}} {{reason}}"),
        )
    )
    grid.add(
        timeseries(
            "SLO traffic shifts",
            "Changes the latency objective's steering made to the model's split, by reason (slimctl slo NAME --watch lists each one).",
            "short",
            ('sum by (reason) (increase(slimserve_slo_shifts_total{model="$model"}[$__rate_interval]))', "{{reason}}"),
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

    rollout_row(grid)
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
    board = dashboard(
        "slimserve-model",
        "slimserve / model and variants",
        "One model's variants side by side: traffic, latency, batching, cost, accuracy, shadow agreement, and an A/B comparison.",
        variables,
        grid.numbered(),
    )
    board["annotations"]["list"] += rollout_annotations()
    return board
