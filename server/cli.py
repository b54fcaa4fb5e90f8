"""The `slimserve` command: start the server (and, offline, run the optimizer)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from server.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="slimserve: serve models and make them smaller and faster.")


@app.callback()
def _root() -> None:
    """slimserve: serve models and make them smaller and faster."""


@app.command()
def start(
    repository: Optional[Path] = typer.Option(None, help="Repository directory [env SLIMSERVE_REPOSITORY; default ./slimserve-repository]."),
    host: Optional[str] = typer.Option(None, help="Address to listen on [default 127.0.0.1]."),
    grpc_port: Optional[int] = typer.Option(None, help="gRPC port [default 8001; 0 picks a free one]."),
    metrics_port: Optional[int] = typer.Option(None, help="Prometheus port [default 8002; 0 picks a free one, -1 disables]."),
    node_type: Optional[str] = typer.Option(None, help="Node type for metrics and cost (cpu, gpu-v100, tpu-v3-8, ...)."),
    prices: Optional[Path] = typer.Option(None, help="YAML/JSON of node type -> dollars per hour, extending the built-in prices."),
    token_file: Optional[Path] = typer.Option(None, help="File holding the bearer token management calls must carry."),
    protect_inference: Optional[bool] = typer.Option(None, "--protect-inference", help="Require the token for inference too."),
    tls_cert: Optional[Path] = typer.Option(None, help="PEM certificate (chain) of the server: serve over TLS."),
    tls_key: Optional[Path] = typer.Option(None, help="PEM private key of --tls-cert."),
    tls_ca: Optional[Path] = typer.Option(None, help="PEM CA bundle: require client certificates it signed (mutual TLS)."),
    max_message_bytes: Optional[int] = typer.Option(None, help="Largest gRPC message [default 64 MiB]."),
    compute_threads: Optional[int] = typer.Option(None, help="Worker threads that run models [default 2]."),
    intra_op_threads: Optional[int] = typer.Option(None, help="Threads inside one model call [default: cores / compute threads]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda [default auto]."),
    batching: Optional[bool] = typer.Option(None, "--batching/--no-batching", help="Dynamic batching [default on]."),
    max_batch_size: Optional[int] = typer.Option(None, help="Largest batch the batcher forms [default 32]."),
    max_queue_delay_ms: Optional[float] = typer.Option(None, help="Longest wait for a batch to fill, ms [default 0.5]."),
    max_queue_size: Optional[int] = typer.Option(None, help="Requests waiting per variant before RESOURCE_EXHAUSTED [default 1024]."),
    inline_compute_ms: Optional[float] = typer.Option(None, help="ORT CPU calls (batched or not) shorter than this run on the event loop, no thread hand-off [default 0.5; 0: never]."),
    max_concurrent_calls: Optional[int] = typer.Option(None, help="Model calls of one variant at once [default 1; raise for big models on many cores]."),
    read_only: Optional[bool] = typer.Option(None, "--read-only", help="Serve a repository another slimserve writes (a replica)."),
    poll_repository_s: Optional[float] = typer.Option(None, help="Seconds between checks for models another server changed [0: never]."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Start the gRPC server (Open Inference Protocol + slimserve.v1) and the /metrics endpoint."""
    from server.app import SlimServer
    from server.errors import SlimServeError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {k: v for k, v in locals().items() if v is not None and k in Settings.model_fields}
    try:
        settings = Settings(**flags)
        server = SlimServer(settings)
    except (OSError, ValueError, SlimServeError) as e:  # e.g. the repository is another server's (its writer lock)
        typer.echo(f"slimserve: {e}", err=True)
        raise typer.Exit(2) from e
    if settings.device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"'{settings.device}' is not one of auto, cpu, cuda", param_hint="--device")
    try:
        asyncio.run(server.serve_until_signal())
    except OSError as e:
        typer.echo(f"slimserve: {e}", err=True)
        raise typer.Exit(1) from e


@app.command()
def optimize(
    model_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="ONNX (.onnx) or torch.export archive (.pt2)."),
    recipe: str = typer.Option(..., "--recipe", help="Recipe names joined by commas, or a JSON/YAML recipe file."),
    data: Optional[Path] = typer.Option(None, "--data", exists=True, help="Evaluation .npz (arrays per input, plus 'labels')."),
    train: Optional[Path] = typer.Option(None, "--train", exists=True, help="Training .npz for passes that fine-tune."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", exists=True, help="Calibration .npz for static quantization."),
    out: Path = typer.Option(..., "--out", help="Directory for the optimized model, report.json and evaluation.json."),
    variant_name: str = typer.Option("", "--name", help="Name of the variant in the report [default: the recipe's name]."),
    accuracy_budget: Optional[float] = typer.Option(None, "--accuracy-budget", help="Fail if more accuracy points are lost."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Optimize a model file offline (no server): run the recipe, measure, write the result and the report."""
    import json
    import shutil
    import tempfile

    from rich.console import Console
    from rich.progress import BarColumn, Progress

    from optimizer.base import Artifact, OptimizerError, PassContext
    from optimizer.pipeline import optimize as run_optimize
    from optimizer.recipes import parse_recipe
    from client.report import render_report
    from optimizer.report import to_json
    from server.errors import InvalidArgument
    from server.registry import check_dataset
    from server.repository import RUNTIME_OF_FORMAT, inspect_npz, model_format
    from server.runtimes import RuntimeConfig, create_runtime

    console = Console(stderr=True)
    config = RuntimeConfig(device=device)

    def factory(path: Path, runtime: str):
        r = create_runtime(runtime, path, config)
        r.load()
        return r

    try:
        fmt = model_format(model_file.name)
        probe = factory(model_file, RUNTIME_OF_FORMAT[fmt])
        datasets = {role: p for role, p in (("data", data), ("train", train), ("calibration", calibration)) if p is not None}
        for role, path in datasets.items():
            check_dataset(role, inspect_npz(path, role), probe.inputs)
        parsed = parse_recipe(recipe)
        name = variant_name or parsed.name
        source = Artifact(model_file, fmt, input_names=tuple(s.name for s in probe.inputs), output_names=tuple(s.name for s in probe.outputs))
        with tempfile.TemporaryDirectory() as tmp, Progress(
            "[progress.description]{task.description}", BarColumn(), "{task.fields[detail]}", console=console, transient=True
        ) as bar:
            task = bar.add_task(name, total=1.0, detail="")
            context = PassContext(
                workdir=Path(tmp),
                datasets=datasets,
                progress=lambda e: bar.update(task, completed=e.fraction, description=e.stage, detail=e.message),
            )
            result = run_optimize(source, parsed, context, factory, name, accuracy_budget)
            out.mkdir(parents=True, exist_ok=True)
            target = out / f"model.{result.artifact.format}"
            shutil.copyfile(result.artifact.path, target)
    except (OptimizerError, InvalidArgument) as e:
        typer.echo(f"slimserve optimize: {e}", err=True)
        raise typer.Exit(1) from e
    (out / "report.json").write_text(to_json(result.report))
    (out / "evaluation.json").write_text(
        json.dumps({"baseline": result.baseline.to_dict(), name: result.evaluation.to_dict(), "runtime": result.artifact.runtime}, indent=2)
    )
    Console().print(render_report(result.report, f"{model_file.name}: {name}"))
    typer.echo(f"wrote {target} ({result.artifact.runtime}), {out / 'report.json'}")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
