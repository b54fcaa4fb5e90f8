"""`slimctl`: register, list, query and delete models on a slimserve server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from client.client import ROWS_REQUEST_BYTES, SlimServeClient, SlimServeClientError, split_rows
from client.report import render_report

app = typer.Typer(add_completion=False, no_args_is_help=True, help="slimctl: manage and query a slimserve server.")
# Wide when piped, so that tables in logs and CI output are not folded to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)
err = Console(stderr=True)


class State:
    server: str | None = None
    token: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


state = State()


@app.callback()
def options(
    server: Optional[str] = typer.Option(None, envvar="SLIMSERVE_SERVER", help="HOST:PORT of the server [default 127.0.0.1:8001]."),
    token: Optional[str] = typer.Option(None, envvar="SLIMSERVE_TOKEN", help="Bearer token for management calls."),
    tls_ca: Optional[Path] = typer.Option(None, envvar="SLIMSERVE_TLS_CA", help="PEM CA of the server's certificate: connect over TLS."),
    tls_cert: Optional[Path] = typer.Option(None, envvar="SLIMSERVE_TLS_CERT", help="PEM client certificate, for servers that require mutual TLS."),
    tls_key: Optional[Path] = typer.Option(None, envvar="SLIMSERVE_TLS_KEY", help="PEM private key of --tls-cert."),
) -> None:
    state.server, state.token = server, token
    state.tls_ca, state.tls_cert, state.tls_key = tls_ca, tls_cert, tls_key


def connect() -> SlimServeClient:
    try:
        return SlimServeClient(state.server, state.token, tls_ca=state.tls_ca, tls_cert=state.tls_cert, tls_key=state.tls_key)
    except SlimServeClientError as e:
        fail(e.message)


def fail(message: str) -> None:
    err.print(f"slimctl: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def shape_text(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


@app.command()
def register(
    name: str = typer.Argument(..., help="Name to serve the model under."),
    model_file: Path = typer.Argument(..., help="ONNX (.onnx) or torch.export archive (.pt2)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation .npz: one array per input, plus 'labels'."),
    train: Optional[Path] = typer.Option(None, "--train", help="Training .npz for passes that fine-tune."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration .npz for static quantization."),
    description: str = typer.Option("", help="Free text shown by `slimctl models`."),
    as_json: bool = typer.Option(False, "--json", help="Print the model record as JSON."),
) -> None:
    """Upload a model (and its data) to the server; it serves as variant 'baseline' at once."""
    try:
        with connect() as client:
            quiet = as_json or not err.is_terminal
            with Progress(
                "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TimeRemainingColumn(), console=err, disable=quiet, transient=True,
            ) as bar:
                task = bar.add_task(f"uploading {name}", total=None)
                record = client.register(
                    name, model_file, data=data, train=train, calibration=calibration, description=description,
                    progress=lambda sent, total: bar.update(task, completed=sent, total=total),
                )
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(record)
        return
    baseline = record["variants"][0]
    console.print(f"registered [bold]{record['name']}[/] ({record['format']}, {human_bytes(baseline['size_bytes'])}), serving variant 'baseline' on {baseline['runtime']}")
    print_signature(record)


def print_signature(record: dict[str, Any]) -> None:
    table = Table("tensor", "name", "datatype", "shape", box=None, pad_edge=False)
    for kind in ("inputs", "outputs"):
        for s in record[kind]:
            table.add_row(kind[:-1], s["name"], s["datatype"], shape_text(s["shape"]))
    console.print(table)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print a list of model records as JSON.")) -> None:
    """List registered models."""
    try:
        with connect() as client:
            records = client.models()
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(records)
        return
    if not records:
        console.print("no models registered; add one with `slimctl register NAME MODEL_FILE`")
        return
    table = Table("model", "format", "variants", "serving", "inputs", "data", "registered")
    for r in records:
        inputs = ", ".join(f"{s['name']} {s['datatype']}{shape_text(s['shape'])}" for s in r["inputs"])
        table.add_row(r["name"], r["format"], str(len(r["variants"])), r["default_variant"], inputs, ", ".join(r["datasets"]) or "-", r["created_at"])
    console.print(table)


@app.command()
def variants(
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Print one record per variant as JSON."),
) -> None:
    """List a model's variants with their measurements."""
    try:
        with connect() as client:
            record = client.model(name)
    except SlimServeClientError as e:
        fail(str(e))
    rows = record["variants"]
    if as_json:
        keys = ("name", "recipe", "parent", "runtime", "status", "params", "nonzero_params", "size_bytes", "flops",
                "latency_p50_ms", "latency_p99_ms", "throughput", "accuracy", "accuracy_delta")
        print_json([{k: v[k] for k in keys} for v in rows])
        return
    table = Table("variant", "recipe", "runtime", "status", "params", "size", "MFLOPs", "p50 ms", "p99 ms", "samples/s", "accuracy", "Δ pts")
    for v in rows:
        acc = None if v["accuracy"] is None else v["accuracy"] * 100
        table.add_row(
            v["name"], v["recipe"] or "-", v["runtime"], v["status"], fmt(v["params"]), human_bytes(v["size_bytes"]),
            fmt(None if v["flops"] is None else v["flops"] / 1e6), fmt(v["latency_p50_ms"], 3), fmt(v["latency_p99_ms"], 3),
            fmt(v["throughput"], 0), fmt(acc), fmt(v["accuracy_delta"]),
        )
    console.print(table)


@app.command()
def optimize(
    name: str = typer.Argument(..., help="Model name."),
    recipe: str = typer.Option(..., "--recipe", help="Recipe names joined by commas (quantize-static, graph-ort, ...) or a JSON/YAML recipe file."),
    variant_name: str = typer.Option("", "--name", help="Name of the new variant [default: the recipe's name]."),
    accuracy_budget: Optional[float] = typer.Option(None, "--accuracy-budget", help="Refuse the variant if it loses more than this many accuracy points."),
    parent: str = typer.Option("", "--parent", help="Variant to start from [default: baseline]."),
    as_json: bool = typer.Option(False, "--json", help="Print the new variant's record as JSON instead of the report."),
) -> None:
    """Derive a variant with a recipe; blocks with a progress bar until it is measured and serving."""
    try:
        with connect() as client, Progress(
            "[progress.description]{task.description}", BarColumn(), "[progress.percentage]{task.percentage:>3.0f}%",
            "{task.fields[detail]}", console=err, disable=as_json or not err.is_terminal, transient=True,
        ) as bar:
            task = bar.add_task(f"optimizing {name}", total=1.0, detail="")

            def on_progress(p) -> None:
                detail = p.message
                if p.HasField("epoch"):
                    detail += f" epoch {p.epoch}"
                if p.HasField("loss"):
                    detail += f" loss {p.loss:.4f}"
                if p.HasField("accuracy"):
                    detail += f" acc {p.accuracy * 100:.2f}%"
                bar.update(task, completed=p.fraction, description=p.stage, detail=detail)

            variant, report = client.optimize(
                name, recipe, variant_name=variant_name, accuracy_budget=accuracy_budget, parent=parent, on_progress=on_progress
            )
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(variant)
        return
    print_report(report, f"{name}: {variant['name']} ({variant['recipe']}) against baseline")


def print_report(rows: list[dict[str, Any]], title: str) -> None:
    """Report rows as the optimizer built them, rendered by client.report (the table `slimserve optimize` prints too)."""
    if rows:
        console.print(render_report(rows, title))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        fail(f"input file '{path}' does not exist")
    except (ValueError, OSError) as e:
        fail(f"'{path}' is not a plain .npz archive: {e}")
    return {}


@app.command()
def infer(
    name: str = typer.Argument(..., help="Model name."),
    input_file: Path = typer.Argument(..., help=".npz with one array per model input (other arrays, e.g. 'labels', are ignored)."),
    variant: str = typer.Option("", "--variant", help="Pin a variant instead of letting the server route."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the outputs to this .npz."),
    as_json: bool = typer.Option(False, "--json", help="Print the outputs as JSON."),
) -> None:
    """Run a model on the arrays of an .npz file, of any size: rows go in requests that fit a message."""
    arrays = load_npz(input_file)
    try:
        with connect() as client:
            meta = client.metadata(name, variant)
            names = [i.name for i in meta.inputs]
            missing = [n for n in names if n not in arrays]
            if missing:
                fail(f"'{input_file}' has no array for input {', '.join(repr(m) for m in missing)} (it holds: {', '.join(arrays)})")
            inputs = {n: arrays[n] for n in names}
            first_dims = {i.shape[0] for i in meta.inputs if len(i.shape) > 0}
            fixed = next(iter(first_dims)) if len(first_dims) == 1 and -1 not in first_dims else None
            try:
                parts = len(split_rows(inputs, ROWS_REQUEST_BYTES, fixed))
            except ValueError as e:
                fail(f"'{input_file}': {e}")
            with Progress(
                "[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total} rows", TimeRemainingColumn(),
                console=Console(stderr=True), transient=True, disable=parts == 1,
            ) as bar:
                task = bar.add_task(f"infer {name}", total=None)
                answer = client.infer_rows(
                    name, inputs, variant=variant, max_request_bytes=ROWS_REQUEST_BYTES, fixed_batch=fixed,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
    except SlimServeClientError as e:
        fail(str(e))
    outputs = answer.outputs
    answered_by = ", ".join(dict.fromkeys(answer.variants))
    if output is not None:
        np.savez(output, **outputs)
    labels = arrays.get("labels")
    if as_json:
        print_json({
            "model": name,
            "variant": answered_by,
            "request_id": answer.request_ids[0],
            "request_ids": answer.request_ids,
            "outputs": {k: {"datatype": str(v.dtype), "shape": list(v.shape), "data": v.tolist()} for k, v in outputs.items()},
        })
        return
    requests = answer.request_ids[0] if len(answer.request_ids) == 1 else f"{len(answer.request_ids)} requests"
    table = Table("output", "dtype", "shape", "first values", title=f"{name} (variant {answered_by}, request {requests})")
    for k, v in outputs.items():
        head = np.array2string(v.reshape(-1)[:6], precision=3, separator=", ")
        table.add_row(k, str(v.dtype), shape_text(list(v.shape)), head)
    console.print(table)
    first = next(iter(outputs.values()))
    if labels is not None and first.ndim == 2 and len(labels) == len(first):
        console.print(f"accuracy on 'labels': {(first.argmax(1) == labels).mean() * 100:.2f}% of {len(labels)}")


@app.command()
def delete(
    name: str = typer.Argument(..., help="Model name."),
    variant: str = typer.Option("", "--variant", help="Delete only this variant (never the baseline)."),
) -> None:
    """Unload a model and remove it, with all its variants and data; or, with --variant, one variant."""
    try:
        with connect() as client:
            if variant:
                client.delete_variant(name, variant)
            else:
                client.delete(name)
    except SlimServeClientError as e:
        fail(str(e))
    console.print(f"deleted {name}" + (f" variant {variant}" if variant else ""))


# ---------------------------------------------------------------------- traffic and experiments


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
    table = Table("variant", "share", "role", title=f"traffic of {policy['model']}")
    for variant, weight in policy["weights"].items():
        table.add_row(variant, f"{weight * 100:.1f}%", "primary")
    for variant in policy["shadows"]:
        table.add_row(variant, "copy", "shadow")
    console.print(table)
    notes = []
    if policy["sticky_parameter"]:
        notes.append(f"sticky by request parameter '{policy['sticky_parameter']}'")
    if policy["can_rollback"]:
        notes.append(f"'slimctl rollback {policy['model']}' restores the previous split")
    for note in notes:
        console.print(note)


@app.command()
def traffic(
    name: str = typer.Argument(..., help="Model name."),
    weights: Optional[list[str]] = typer.Argument(None, help="VARIANT=WEIGHT pairs, e.g. baseline=70 int8=30 (normalized)."),
    shadow: Optional[list[str]] = typer.Option(None, "--shadow", help="Variant that gets a copy of the traffic (repeatable)."),
    sticky: Optional[str] = typer.Option(None, "--sticky", help="Request parameter whose value pins a caller to a variant."),
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


@app.command()
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


@app.command()
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


@app.command()
def feedback(
    name: str = typer.Argument(..., help="Model name."),
    request_id: str = typer.Argument(..., help="Id of the inference request (the response's id)."),
    label: int = typer.Argument(..., help="The true class of that request's input."),
) -> None:
    """Record the ground truth of an earlier request, for online accuracy per variant."""
    try:
        with connect() as client:
            result = client.feedback(name, request_id, label)
    except SlimServeClientError as e:
        fail(str(e))
    console.print(f"{request_id}: answered by {result['variant']}, {'correct' if result['correct'] else 'wrong'}")


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


@app.command()
def compare(
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Print one record per variant as JSON."),
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
    table = Table(
        "variant", "share", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "batch", "$/1k inf", "offline acc",
        "online acc (95% CI)", "latency vs baseline", "accuracy vs baseline",
        title=f"{name} on {result['node_type']} ({result['price_per_hour']:.2f} $/h)", box=box.SIMPLE_HEAVY,
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
            r["variant"], share, fmt(r["requests"]), fmt(r["errors"]), fmt(r["latency_p50_ms"], 3), fmt(r["latency_p90_ms"], 3),
            fmt(r["latency_p99_ms"], 3), fmt(r["mean_batch"], 1),
            "-" if r["cost_per_1000"] is None else f"{r['cost_per_1000']:.2e}",
            pct(r["offline_accuracy"]), online, r["latency_verdict"] or "-", r["accuracy_verdict"] or "-",
        )
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
