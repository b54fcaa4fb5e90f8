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
    token_file: Optional[Path] = typer.Option(None, help="File holding the bearer token management calls must carry."),
    protect_inference: Optional[bool] = typer.Option(None, "--protect-inference", help="Require the token for inference too."),
    max_message_bytes: Optional[int] = typer.Option(None, help="Largest gRPC message [default 64 MiB]."),
    compute_threads: Optional[int] = typer.Option(None, help="Worker threads that run models [default 2]."),
    intra_op_threads: Optional[int] = typer.Option(None, help="Threads inside one model call [default: the runtime's]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda [default auto]."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Start the gRPC server (Open Inference Protocol + slimserve.v1) and the /metrics endpoint."""
    from server.app import SlimServer

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {k: v for k, v in locals().items() if v is not None and k in Settings.model_fields}
    settings = Settings(**flags)
    if settings.device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"'{settings.device}' is not one of auto, cpu, cuda", param_hint="--device")
    try:
        asyncio.run(SlimServer(settings).serve_until_signal())
    except OSError as e:
        typer.echo(f"slimserve: {e}", err=True)
        raise typer.Exit(1) from e


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
