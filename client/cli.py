"""`slimctl`: the app and its options, and the model commands: register, list, optimize, query and delete models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from slimserve.client import cli_rollout, cli_traffic
from slimserve.client.cli_common import connect, console, err, fail, fmt, human_bytes, print_json, shape_text, state
from slimserve.client.client import ROWS_REQUEST_BYTES, SlimServeClientError, split_rows
from slimserve.client.report import render_report

app = typer.Typer(add_completion=False, no_args_is_help=True, help="slimctl: manage and query a slimserve server.")


@app.callback()
def options(
    server: str | None = typer.Option(None, envvar="SLIMSERVE_SERVER", help="HOST:PORT of the server [default 127.0.0.1:8001]."),
    token: str | None = typer.Option(None, envvar="SLIMSERVE_TOKEN", help="Bearer token for management calls."),
    tls_ca: Path | None = typer.Option(None, envvar="SLIMSERVE_TLS_CA", help="PEM CA of the server's certificate: connect over TLS."),
    tls_cert: Path | None = typer.Option(
        None, envvar="SLIMSERVE_TLS_CERT", help="PEM client certificate, for servers that require mutual TLS."
    ),
    tls_key: Path | None = typer.Option(None, envvar="SLIMSERVE_TLS_KEY", help="PEM private key of --tls-cert."),
) -> None:
    state.server, state.token = server, token
    state.tls_ca, state.tls_cert, state.tls_key = tls_ca, tls_cert, tls_key


@app.command()
def register(
    name: str = typer.Argument(..., help="Name to serve the model under."),
    model_file: Path = typer.Argument(..., help="ONNX (.onnx) or torch.export archive (.pt2)."),
    data: Path | None = typer.Option(None, "--data", help="Evaluation .npz: one array per input, plus 'labels'."),
    train: Path | None = typer.Option(None, "--train", help="Training .npz for passes that fine-tune."),
    calibration: Path | None = typer.Option(None, "--calibration", help="Calibration .npz for static quantization."),
    description: str = typer.Option("", help="Free text shown by `slimctl models`."),
    sequence_inputs: str = typer.Option(
        "",
        "--sequence-inputs",
        help="Token inputs (INT64 [batch, seq]) served at their real length, comma-separated; default: detected by name.",
    ),
    attention_mask: str = typer.Option("", "--attention-mask", help="The mask among --sequence-inputs (default: attention_mask)."),
    as_json: bool = typer.Option(False, "--json", help="Print the model record as JSON."),
) -> None:
    """Upload a model (and its data) to the server; it serves as variant 'baseline' at once."""
    try:
        with connect() as client:
            quiet = as_json or not err.is_terminal
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err,
                disable=quiet,
                transient=True,
            ) as bar:
                task = bar.add_task(f"uploading {name}", total=None)
                record = client.register(
                    name,
                    model_file,
                    data=data,
                    train=train,
                    calibration=calibration,
                    description=description,
                    progress=lambda sent, total: bar.update(task, completed=sent, total=total),
                    sequence_inputs=[n.strip() for n in sequence_inputs.split(",") if n.strip()],
                    attention_mask=attention_mask,
                )
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(record)
        return
    baseline = record["variants"][0]
    console.print(
        f"registered [bold]{record['name']}[/] ({record['format']}, {human_bytes(baseline['size_bytes'])}), serving variant 'baseline' on {baseline['runtime']}"
    )
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
        table.add_row(
            r["name"], r["format"], str(len(r["variants"])), r["default_variant"], inputs, ", ".join(r["datasets"]) or "-", r["created_at"]
        )
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
        keys = (
            "name",
            "recipe",
            "parent",
            "runtime",
            "status",
            "params",
            "nonzero_params",
            "size_bytes",
            "flops",
            "latency_p50_ms",
            "latency_p99_ms",
            "throughput",
            "accuracy",
            "accuracy_delta",
        )
        print_json([{k: v[k] for k in keys} for v in rows])
        return
    table = Table(
        "variant", "recipe", "runtime", "status", "params", "size", "MFLOPs", "p50 ms", "p99 ms", "samples/s", "accuracy", "Δ pts"
    )
    for v in rows:
        acc = None if v["accuracy"] is None else v["accuracy"] * 100
        table.add_row(
            v["name"],
            v["recipe"] or "-",
            v["runtime"],
            v["status"],
            fmt(v["params"]),
            human_bytes(v["size_bytes"]),
            fmt(None if v["flops"] is None else v["flops"] / 1e6),
            fmt(v["latency_p50_ms"], 3),
            fmt(v["latency_p99_ms"], 3),
            fmt(v["throughput"], 0),
            fmt(acc),
            fmt(v["accuracy_delta"]),
        )
    console.print(table)


@app.command()
def optimize(
    name: str = typer.Argument(..., help="Model name."),
    recipe: str = typer.Option(
        ..., "--recipe", help="Recipe names joined by commas (quantize-static, graph-ort, ...) or a JSON/YAML recipe file."
    ),
    variant_name: str = typer.Option("", "--name", help="Name of the new variant [default: the recipe's name]."),
    accuracy_budget: float | None = typer.Option(
        None,
        "--accuracy-budget",
        help="Points of accuracy (or of the quality metric) the variant may lose: pruning ratios and student widths are searched "
        "for the most aggressive within it, fine-tuning goes on while over it, and a variant over it is refused.",
    ),
    keep_over_budget: bool = typer.Option(
        False, "--keep-over-budget", help="Register the best a budget search reached even when it misses the budget (marked in the report)."
    ),
    parent: str = typer.Option("", "--parent", help="Variant to start from [default: baseline]."),
    as_json: bool = typer.Option(False, "--json", help="Print the new variant's record as JSON instead of the report."),
) -> None:
    """Derive a variant with a recipe; blocks with a progress bar until it is measured and serving."""
    try:
        with (
            connect() as client,
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                "[progress.percentage]{task.percentage:>3.0f}%",
                "{task.fields[detail]}",
                console=err,
                disable=as_json or not err.is_terminal,
                transient=True,
            ) as bar,
        ):
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
                name,
                recipe,
                variant_name=variant_name,
                accuracy_budget=accuracy_budget,
                parent=parent,
                on_progress=on_progress,
                keep_over_budget=keep_over_budget,
            )
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(variant)
        return
    print_report(report, f"{name}: {variant['name']} ({variant['recipe']}) against baseline")


def print_report(rows: list[dict[str, Any]], title: str) -> None:
    """Report rows as the optimizer built them, rendered by slimserve.client.report (the table `slimserve optimize` prints too)."""
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
    output: Path | None = typer.Option(None, "--output", help="Write the outputs to this .npz."),
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
                "[progress.description]{task.description}",
                BarColumn(),
                "{task.completed}/{task.total} rows",
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
                disable=parts == 1,
            ) as bar:
                task = bar.add_task(f"infer {name}", total=None)
                answer = client.infer_rows(
                    name,
                    inputs,
                    variant=variant,
                    max_request_bytes=ROWS_REQUEST_BYTES,
                    fixed_batch=fixed,
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
        print_json(
            {
                "model": name,
                "variant": answered_by,
                "request_id": answer.request_ids[0],
                "request_ids": answer.request_ids,
                "outputs": {k: {"datatype": str(v.dtype), "shape": list(v.shape), "data": v.tolist()} for k, v in outputs.items()},
            }
        )
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


# The traffic and experiment commands (client/cli_traffic.py) come after the model commands in help.
cli_traffic.add_commands(app)
cli_rollout.add_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
