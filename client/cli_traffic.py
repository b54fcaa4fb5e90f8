"""The `slimctl` commands of live traffic and experiments: traffic, promote, rollback, feedback, compare."""

from __future__ import annotations

from typing import Any

import typer
from rich import box

from slimserve.client.cli_common import connect, console, fail, fmt, print_json
from slimserve.client.client import SlimServeClientError
from slimserve.client.tables import Col, FitTable, output_option


def add_commands(app: typer.Typer) -> None:
    """Registers these commands on slimctl's app; called after the model commands, so help lists them in this order."""
    for command in (traffic, promote, rollback, feedback, compare):
        app.command()(command)


def parse_weights(pairs: list[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in pairs:
        variant, sep, value = pair.partition("=")
        if not sep or not variant:
            fail(f"'{pair}' is not VARIANT=WEIGHT (e.g. baseline=70 int8=30)")
        if variant in weights:
            fail(f"variant '{variant}' is given twice")
        try:
            weights[variant] = float(value)
        except ValueError:
            fail(f"weight of '{variant}' must be a number, got '{value}'")
    return weights


def print_traffic(policy: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(policy)
        return
    table = FitTable(
        [Col("variant", style="bold"), Col("share", rank=1, justify="right"), Col("role", rank=2)], title=f"traffic of {policy['model']}"
    )
    for variant, weight in policy["weights"].items():
        table.add_row(variant, f"{weight * 100:.1f}%", "primary")
    for variant in policy["shadows"]:
        table.add_row(variant, "copy", "shadow")
    table.print(console)
    notes = []
    if policy["sticky_parameter"]:
        notes.append(f"sticky by request parameter '{policy['sticky_parameter']}'")
    if policy["can_rollback"]:
        notes.append(f"'slimctl rollback {policy['model']}' restores the previous split")
    for note in notes:
        console.print(note)


def traffic(
    name: str = typer.Argument(..., help="Model name."),
    weights: list[str] | None = typer.Argument(None, help="VARIANT=WEIGHT pairs, e.g. baseline=70 int8=30 (normalized)."),
    shadow: list[str] | None = typer.Option(None, "--shadow", help="Variant that gets a copy of the traffic (repeatable)."),
    sticky: str | None = typer.Option(None, "--sticky", help="Request parameter whose value pins a caller to a variant."),
    as_json: bool = typer.Option(False, "--json", help="Print the policy as JSON."),
) -> None:
    """Split a model's live traffic between variants (no pairs: show the current split)."""
    if not weights and (shadow or sticky):
        fail("give the primary weights too, e.g. 'slimctl traffic NAME baseline=100 --shadow int8'")
    parsed = parse_weights(weights) if weights else None
    try:
        with connect() as client:
            policy = client.traffic(name, parsed, shadow or [], sticky)
    except SlimServeClientError as e:
        fail(str(e))
    print_traffic(policy, as_json)


def promote(
    name: str = typer.Argument(..., help="Model name."),
    variant: str = typer.Argument(..., help="Variant that takes all the traffic."),
    as_json: bool = typer.Option(False, "--json", help="Print the policy as JSON."),
) -> None:
    """Send all of a model's traffic to one variant (the previous split is kept for rollback)."""
    try:
        with connect() as client:
            policy = client.promote(name, variant)
    except SlimServeClientError as e:
        fail(str(e))
    print_traffic(policy, as_json)


def rollback(
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Print the policy as JSON."),
) -> None:
    """Restore a model's traffic split from before the last change."""
    try:
        with connect() as client:
            policy = client.rollback(name)
    except SlimServeClientError as e:
        fail(str(e))
    print_traffic(policy, as_json)


def feedback(
    name: str = typer.Argument(..., help="Model name."),
    request_id: str = typer.Argument(..., help="Id of the inference request (the response's id, as `slimctl infer` prints it)."),
    labels: list[int] = typer.Argument(..., help="The true class of the request's input; for a request of several rows, one per row."),
    row: int | None = typer.Option(None, "--row", help="The row of a multi-row request that the one LABEL is for (0-based)."),
) -> None:
    """Record the ground truth of an earlier request, for online accuracy per variant."""
    try:
        with connect() as client:
            result = client.feedback(name, request_id, labels, row=row)
    except SlimServeClientError as e:
        fail(str(e))
    if result["rows"] > 1:
        verdict = f"{result['correct_rows']} of {result['rows']} rows correct"
    else:
        verdict = "correct" if result["correct"] else "wrong"
    where = f" row {row}" if row is not None else ""
    console.print(f"{request_id}{where}: answered by {result['variant']}, {verdict}")


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def compare(
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Print one record per variant as JSON."),
    output: str = output_option(),
) -> None:
    """Which variant wins on live traffic: latency, batch, cost, offline and online accuracy, significance."""
    try:
        with connect() as client:
            result = client.compare(name)
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(result)
        return
    table = FitTable(
        [
            Col("variant", style="bold"),
            Col("share", rank=1, wraps=True),
            Col("requests", rank=3, justify="right"),
            Col("errors", rank=4, justify="right"),
            Col("p50 ms", rank=2, justify="right"),
            Col("p90 ms", rank=8, justify="right"),
            Col("p99 ms", rank=5, justify="right"),
            Col("batch", rank=9, justify="right"),
            Col("$/1k inf", rank=7, justify="right"),
            Col("offline acc", rank=6, justify="right"),
            Col("online acc (95% CI)", rank=3, wraps=True),
            Col("latency vs baseline", rank=2, wraps=True),
            Col("accuracy vs baseline", rank=2, wraps=True),
        ],
        title=f"{name} on {result['node_type']} ({result['price_per_hour']:.2f} $/h)",
        box=box.SIMPLE_HEAVY,
    )
    for r in result["variants"]:
        share = "shadow" if r["shadow"] else f"{r['weight'] * 100:.0f}%"
        online = pct(r["online_accuracy"])
        if r["online_accuracy_ci"] is not None:
            low, high = r["online_accuracy_ci"]
            online += f" [{low * 100:.1f}, {high * 100:.1f}] n={r['feedback']}"
        if r["shadow_agreement"] is not None:
            share += f" (agrees {r['shadow_agreement'] * 100:.1f}%)"
        table.add_row(
            r["variant"],
            share,
            fmt(r["requests"]),
            fmt(r["errors"]),
            fmt(r["latency_p50_ms"], 3),
            fmt(r["latency_p90_ms"], 3),
            fmt(r["latency_p99_ms"], 3),
            fmt(r["mean_batch"], 1),
            "-" if r["cost_per_1000"] is None else f"{r['cost_per_1000']:.2e}",
            pct(r["offline_accuracy"]),
            online,
            r["latency_verdict"] or "-",
            r["accuracy_verdict"] or "-",
        )
    table.print(console, output)
