"""The `slimserve` command: start the server (and, offline, run the optimizer)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import typer

from slimserve.client.tables import output_option, print_fitted
from slimserve.server.settings import DEVICES, Settings, flag_of, shown_default

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="slimserve: serve models and make them smaller and faster.", rich_markup_mode=None
)


@app.callback()
def _root() -> None:
    """slimserve: serve models and make them smaller and faster."""


def setting_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Gives `command` one flag per Settings field, before its own options; it receives them as keyword arguments.

    Every flag defaults to None (not given): Settings then takes the SLIMSERVE_* variable or the field's default,
    so the flag, the variable and the default come from the one declaration in server/settings.py.
    """
    flags = []
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if get_origin(annotation) in (Union, UnionType):  # Path | None: the flag's own None means "not given"
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        help_text, default = _plain(field.description or ""), _plain(shown_default(field))
        option = typer.Option(None, flag_of(name, field), help=help_text, show_default=default)
        flags.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation | None))
    own = [p for p in inspect.signature(command).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*flags, *own])  # type: ignore[attr-defined]
    return command


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")


@app.command()
@setting_flags
def start(*, log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."), **flags: Any) -> None:
    """Start the gRPC server (Open Inference Protocol + slimserve.v1) and the /metrics endpoint."""
    from slimserve.server.ports import check_ports

    given = {k: v for k, v in flags.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)}
    try:
        settings = Settings(**given)
        check_ports(settings)  # before torch and the models load: a busy port is one line at once
    except (OSError, ValueError) as e:
        typer.echo(f"slimserve: {e}", err=True)
        raise typer.Exit(2) from e
    from slimserve.optimizer.quiet import quiet_third_party
    from slimserve.server.app import SlimServer
    from slimserve.server.errors import SlimServeError

    quiet_third_party()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if settings.device not in DEVICES:
            raise typer.BadParameter(f"'{settings.device}' is not one of {', '.join(DEVICES)}", param_hint="--device")
        server = SlimServer(settings)
    except (OSError, ValueError, SlimServeError) as e:  # e.g. the repository is another server's (its writer lock)
        typer.echo(f"slimserve: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        asyncio.run(server.serve_until_signal())
    except OSError as e:
        typer.echo(f"slimserve: {e}", err=True)
        raise typer.Exit(1) from e


@app.command()
def optimize(
    model_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="ONNX (.onnx) or torch.export archive (.pt2)."),
    recipe: str = typer.Option(..., "--recipe", help="Recipe names joined by commas, or a JSON/YAML recipe file."),
    data: Path | None = typer.Option(None, "--data", exists=True, help="Evaluation .npz (arrays per input, plus 'labels')."),
    train: Path | None = typer.Option(None, "--train", exists=True, help="Training .npz for passes that fine-tune."),
    calibration: Path | None = typer.Option(None, "--calibration", exists=True, help="Calibration .npz for static quantization."),
    out: Path = typer.Option(..., "--out", help="Directory for the optimized model, report.json and evaluation.json."),
    variant_name: str = typer.Option("", "--name", help="Name of the variant in the report [default: the recipe's name]."),
    accuracy_budget: float | None = typer.Option(None, "--accuracy-budget", help="Fail if more accuracy points are lost."),
    keep_over_budget: bool = typer.Option(
        False, "--keep-over-budget", help="Write the best a budget search reached even when it misses the budget (marked in the report)."
    ),
    quality: list[str] = typer.Option(
        [], "--quality", help="OUTPUT=METRIC (accuracy, top1-agreement, cosine, relative-error), repeatable: how an output is scored."
    ),
    evaluator: str = typer.Option(
        "",
        "--evaluator",
        help="A task metric held to the budget too: a built-in, an entry point (slimserve.evaluators) or module:attribute.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    output: str = output_option(),
) -> None:
    """Optimize a model file offline (no server): run the recipe, measure, write the result and the report."""
    import json
    import shutil
    import tempfile

    from rich.console import Console
    from rich.progress import BarColumn, Progress

    from slimserve.client.report import render_report
    from slimserve.optimizer.base import Artifact, OptimizerError, PassContext
    from slimserve.optimizer.evaluation.evaluators import load_evaluator
    from slimserve.optimizer.evaluation.quality import parse_declared
    from slimserve.optimizer.formats.onnx_files import check_side_files, copy_model
    from slimserve.optimizer.pipeline import optimize as run_optimize
    from slimserve.optimizer.quiet import quiet_third_party
    from slimserve.optimizer.recipes import parse_recipe
    from slimserve.optimizer.report import to_json
    from slimserve.server.errors import InvalidArgument
    from slimserve.server.runtimes import RuntimeConfig, create_runtime
    from slimserve.server.store.manifest import RUNTIME_OF_FORMAT, check_dataset, inspect_npz, model_format

    quiet_third_party()
    console = Console(stderr=True)
    config = RuntimeConfig(device=device)

    def factory(path: Path, runtime: str):
        r = create_runtime(runtime, path, config)
        r.load()
        return r

    try:
        fmt = model_format(model_file.name)
        if fmt == "onnx":
            check_side_files(model_file)  # weights in side files: each one named when it is not beside the model
        try:
            probe = factory(model_file, RUNTIME_OF_FORMAT[fmt])
        except Exception as e:  # a graph the checker or the runtime rejects (an operator no provider here implements)
            text = " ".join(str(e).split())[:400]
            raise InvalidArgument(
                f"{model_file.name} does not load in {RUNTIME_OF_FORMAT[fmt]} on this node: {type(e).__name__}: {text}; "
                "export it again with standard operators (or the opset the error names), or optimize it where its runtime is installed"
            ) from e
        datasets = {role: p for role, p in (("data", data), ("train", train), ("calibration", calibration)) if p is not None}
        for role, path in datasets.items():
            check_dataset(role, inspect_npz(path, role), probe.inputs)
        parsed = parse_recipe(recipe)
        declared = parse_declared(quality, [s.name for s in probe.outputs])
        scorer = load_evaluator(evaluator) if evaluator else None
        name = variant_name or parsed.name
        source = Artifact(
            model_file, fmt, input_names=tuple(s.name for s in probe.inputs), output_names=tuple(s.name for s in probe.outputs)
        )
        with (
            tempfile.TemporaryDirectory() as tmp,
            Progress(
                "[progress.description]{task.description}", BarColumn(), "{task.fields[detail]}", console=console, transient=True
            ) as bar,
        ):
            task = bar.add_task(name, total=1.0, detail="")
            context = PassContext(
                workdir=Path(tmp),
                datasets=datasets,
                progress=lambda e: bar.update(task, completed=e.fraction, description=e.stage, detail=e.message),
            )
            result = run_optimize(
                source,
                parsed,
                context,
                factory,
                name,
                accuracy_budget,
                register_over_budget=keep_over_budget,
                declared=declared,
                evaluator=scorer,
            )
            out.mkdir(parents=True, exist_ok=True)
            target = out / f"model.{result.artifact.format}"
            if result.artifact.format == "onnx":
                copy_model(result.artifact.path, target)  # one file under 2 GiB; beyond, its side files beside it
            else:
                shutil.copyfile(result.artifact.path, target)
    except (OptimizerError, InvalidArgument) as e:
        typer.echo(f"slimserve optimize: {e}", err=True)
        raise typer.Exit(1) from e
    (out / "report.json").write_text(to_json(result.report))
    (out / "evaluation.json").write_text(
        json.dumps({"baseline": result.baseline.to_dict(), name: result.evaluation.to_dict(), "runtime": result.artifact.runtime}, indent=2)
    )
    console_out = Console() if sys.stdout.isatty() else Console(width=160)  # wide when piped, as slimctl
    print_fitted(console_out, render_report(result.report, f"{model_file.name}: {name}", console_out.width, output == "wide"), output)
    typer.echo(f"wrote {target} ({result.artifact.runtime}), {out / 'report.json'}")


@app.command()
def passes(
    name: str = typer.Argument("", help="A pass: show its settings (name, type, default, description)."),
    as_json: bool = typer.Option(False, "--json", help="Print the pass records as JSON (the shape of `slimctl passes --json`)."),
) -> None:
    """List the optimizer's passes offline (no server); with NAME, that pass's settings: as `slimctl passes`."""
    import dataclasses
    import json

    from rich.console import Console

    from slimserve.client.report import render_pass_settings, render_passes
    from slimserve.optimizer.base import OptimizerError
    from slimserve.optimizer.catalog import describe, describe_all

    try:
        infos = [describe(name)] if name else describe_all()
    except OptimizerError as e:
        typer.echo(f"slimserve passes: {e}", err=True)
        raise typer.Exit(1) from e
    records = [json.loads(json.dumps(dataclasses.asdict(info))) for info in infos]  # tuples become lists, as over gRPC
    if as_json:
        typer.echo(json.dumps(records[0] if name else records, indent=2))
        return
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(render_pass_settings(records[0]) if name else render_passes(records))


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
