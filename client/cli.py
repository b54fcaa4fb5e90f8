"""`slimctl`: the app and its options, and the model commands: register, list, optimize, query and delete models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from slimserve.client import cli_jobs, cli_rollout, cli_traffic
from slimserve.client.cli_common import (
    cast_float64,
    connect,
    console,
    err,
    fail,
    float64_note,
    fmt,
    human_bytes,
    npz_dtypes,
    print_json,
    shape_text,
    state,
)
from slimserve.client.client import ROWS_REQUEST_BYTES, SlimServeClientError, split_rows
from slimserve.client.report import render_pass_settings, render_passes, render_report
from slimserve.client.tables import Col, FitTable, output_option, print_fitted

app = typer.Typer(add_completion=False, no_args_is_help=True, help="slimctl: manage and query a slimserve server.")


@app.callback()
def options(
    server: str | None = typer.Option(
        None, envvar="SLIMSERVE_SERVER", help="HOST[:PORT] of the server; a bare HOST means port 8001 [default 127.0.0.1:8001]."
    ),
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
    quality: list[str] = typer.Option(
        [], "--quality", help="OUTPUT=METRIC, repeatable: how the optimizer scores an output, for every job of this model."
    ),
    evaluator: str = typer.Option(
        "", "--evaluator", help="An evaluator installed on the server (e.g. detection), held to every job's budget."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="Triton's config.pbtxt (or config.json): max_batch_size, dynamic_batching, instance_group, labels; kept."
    ),
    labels: list[str] = typer.Option([], "--labels", help="OUTPUT=FILE: class labels of an output, one a line (repeat); kept."),
    sequence_inputs: str = typer.Option(
        "",
        "--sequence-inputs",
        help="Token inputs (INT64 [batch, seq]) served at their real length, comma-separated; default: detected by name.",
    ),
    attention_mask: str = typer.Option("", "--attention-mask", help="The mask among --sequence-inputs (default: attention_mask)."),
    as_json: bool = typer.Option(False, "--json", help="Print the model record as JSON."),
) -> None:
    """Upload a model (and its data) to the server; it serves as variant 'baseline' at once."""
    label_files = {}
    for item in labels:
        output, sep, file = item.partition("=")
        if not sep or not output or not file:
            fail(f"--labels {item!r}: expected OUTPUT=FILE, e.g. --labels logits=labels.txt")
        label_files[output] = Path(file)
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
                    quality=quality,
                    evaluator=evaluator,
                    config=config,
                    labels=label_files,
                    sequence_inputs=[n.strip() for n in sequence_inputs.split(",") if n.strip()],
                    attention_mask=attention_mask,
                )
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(record)
        return
    for path in (p for p in (data, train, calibration) if p is not None):  # the server casts as `infer` does: say so here too
        try:
            dtypes = npz_dtypes(path)
        except (OSError, ValueError):
            continue
        for spec in record["inputs"]:
            note = float64_note(spec["name"], path.name, spec["datatype"], dtypes.get(spec["name"], ""))
            if note:
                err.print(note, markup=False, highlight=False)
    baseline = record["variants"][0]
    console.print(
        f"registered [bold]{record['name']}[/] ({record['format']}, {human_bytes(baseline['size_bytes'])}), serving variant 'baseline' on {baseline['runtime']}"
    )
    print_signature(record)


def print_signature(record: dict[str, Any]) -> None:
    table = FitTable([Col("tensor", rank=2), Col("name"), Col("datatype", rank=1), Col("shape", rank=1)], box=None)
    for kind in ("inputs", "outputs"):
        for s in record[kind]:
            table.add_row(kind[:-1], s["name"], s["datatype"], shape_text(s["shape"]))
    table.print(console)


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="Print a list of model records as JSON."), output: str = output_option()
) -> None:
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
    table = FitTable(
        [
            Col("model", style="bold"),
            Col("format", rank=4),
            Col("variants", rank=3, justify="right"),
            Col("serving", rank=1),
            Col("inputs", rank=2, wraps=True),
            Col("data", rank=5, wraps=True),
            Col("registered", rank=6),
        ]
    )
    for r in records:
        inputs = ", ".join(f"{s['name']} {s['datatype']}{shape_text(s['shape'])}" for s in r["inputs"])
        table.add_row(
            r["name"], r["format"], str(len(r["variants"])), r["default_variant"], inputs, ", ".join(r["datasets"]) or "-", r["created_at"]
        )
    table.print(console, output)


@app.command()
def variants(
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Print one record per variant as JSON."),
    output: str = output_option(),
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
    table = FitTable(
        [
            Col("variant", style="bold"),
            Col("recipe", rank=5, wraps=True),
            Col("runtime", rank=7),
            Col("status", rank=2, wraps=True),
            Col("params", rank=8, justify="right"),
            Col("size", rank=3, justify="right"),
            Col("MFLOPs", rank=9, justify="right"),
            Col("p50 ms", rank=1, justify="right"),
            Col("p99 ms", rank=6, justify="right"),
            Col("samples/s", rank=10, justify="right"),
            Col("accuracy", rank=4, justify="right"),
            Col("Δ pts", rank=1, justify="right"),
        ]
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
    table.print(console, output)


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
    quality: list[str] = typer.Option(
        [],
        "--quality",
        help="OUTPUT=METRIC (accuracy, top1-agreement, cosine, relative-error), repeatable: how an output is scored; the "
        "others get a metric from their shape, datatype and name. The budget holds the worst output.",
    ),
    evaluator: str = typer.Option(
        "",
        "--evaluator",
        help="A task metric in points held to the budget too: classification-top1, classification-top5, detection, "
        "segmentation, or an evaluator installed on the server (entry point group slimserve.evaluators, or module:attribute).",
    ),
    parent: str = typer.Option("", "--parent", help="Variant to start from [default: baseline]."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the new variant's record as JSON, with the whole report (auto's candidates included) under 'report'."
    ),
    output: str = output_option(),
    detach: bool = typer.Option(
        False, "--detach", help="Return as soon as the job is queued, printing its id; follow it with `slimctl jobs`."
    ),
    cancel_on_interrupt: bool = typer.Option(
        False,
        "--cancel-on-interrupt",
        help="Ctrl-C cancels the job without asking (by default it asks; without a terminal the job goes on).",
    ),
) -> None:
    """Derive a variant with a recipe; blocks with a progress bar until it is measured and serving (Ctrl-C: cancel or leave it)."""
    job_ids: list[str] = []
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
                quality=quality,
                evaluator=evaluator,
                on_job=job_ids.append,
                detach=detach,
            )
    except SlimServeClientError as e:
        fail(str(e))
    except KeyboardInterrupt:
        cli_jobs.interrupted(job_ids[0] if job_ids else "", cancel_on_interrupt)
        return
    if detach:
        if as_json:
            print_json(variant)
        else:
            console.print(
                f"job {variant['job_id']} queued: follow it with `slimctl jobs`, stop it with `slimctl jobs cancel {variant['job_id']}`"
            )
        return
    if as_json:
        print_json({**variant, "report": report})
        return
    print_report(report, f"{name}: {variant['name']} ({variant['recipe']}) against baseline", output)


@app.command()
def passes(
    name: str = typer.Argument("", help="A pass: show its settings (name, type, default, description)."),
    as_json: bool = typer.Option(False, "--json", help="Print the pass records as JSON."),
) -> None:
    """List the optimizer's passes (kind, what each needs); with NAME, that pass's settings for a recipe."""
    try:
        with connect() as client:
            records = client.passes(name)
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(records[0] if name else records)
    elif name:
        console.print(render_pass_settings(records[0]))
    else:
        console.print(render_passes(records))


def print_report(rows: list[dict[str, Any]], title: str, output: str = "table") -> None:
    """Report rows as the optimizer built them, rendered by slimserve.client.report (the table `slimserve optimize` prints too)."""
    if rows:
        print_fitted(console, render_report(rows, title, console.width, wide=output == "wide"), output)


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
            inputs = cast_float64({n: arrays[n] for n in names}, meta.inputs, input_file.name)
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
    table = FitTable(
        [Col("output", style="bold"), Col("dtype", rank=2), Col("shape", rank=1), Col("first values", rank=3, wraps=True)],
        title=f"{name} (variant {answered_by}, request {requests})",
    )
    for k, v in outputs.items():
        head = np.array2string(v.reshape(-1)[:6], precision=3, separator=", ")
        table.add_row(k, str(v.dtype), shape_text(list(v.shape)), head)
    table.print(console)
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
                before = client.traffic(name)
                after = client.delete_variant(name, variant)["traffic"]
            else:
                client.delete(name)
    except SlimServeClientError as e:
        fail(str(e))
    if not variant:
        console.print(f"deleted {name}")
        return
    console.print(f"deleted {name} variant {variant}; {traffic_moved(variant, before, after)}")


def traffic_moved(variant: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    """Where a deleted variant's share of the traffic went, in words."""
    share = before["weights"].get(variant, 0.0)
    now = ", ".join(f"{v} {w * 100:.0f}%" for v, w in after["weights"].items() if w > 0) or "none"
    if share > 0:
        gained = [v for v, w in after["weights"].items() if w > before["weights"].get(v, 0.0) + 1e-9]
        to = " and ".join(gained) or "the other variants"
        return f"its {share * 100:.0f}% of the traffic now goes to {to} (traffic: {now})"
    if variant in before["shadows"]:
        return f"it was a shadow and no longer gets copies (traffic: {now})"
    return f"it served no traffic (traffic: {now})"


# The traffic and experiment commands (client/cli_traffic.py) come after the model commands in help.
cli_traffic.add_commands(app)
cli_rollout.add_commands(app)
cli_jobs.add_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
