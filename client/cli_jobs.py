"""The `slimctl jobs` commands: list optimizer jobs (queued, running, ended) and cancel one."""

from __future__ import annotations

import sys

import typer
from rich import box
from rich.table import Table

from slimserve.client.cli_common import connect, console, err, fail, print_json
from slimserve.client.client import SlimServeClientError

jobs_app = typer.Typer(help="Optimizer jobs: list them with their state and progress, cancel one.")


def add_commands(app: typer.Typer) -> None:
    """Registers `slimctl jobs [--json]` and `slimctl jobs cancel ID` on slimctl's app."""
    app.add_typer(jobs_app, name="jobs")


@jobs_app.callback(invoke_without_command=True)
def list_jobs(
    ctx: typer.Context,
    model: str = typer.Option("", "--model", help="Only this model's jobs."),
    as_json: bool = typer.Option(False, "--json", help="Print the jobs as JSON (id, model, variant, recipe, status, progress, times)."),
) -> None:
    """List jobs: id, model, recipe, state (queued, running, succeeded, failed, cancelled, interrupted), progress, start, end."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        with connect() as client:
            jobs = client.jobs(model)
    except SlimServeClientError as e:
        fail(str(e))
    jobs.sort(key=lambda j: j["submitted_at"] or j["started_at"])
    if as_json:
        print_json(jobs)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("id", "model", "variant", "recipe", "state", "progress", "started", "ended", "message"):
        table.add_column(column, justify="right" if column == "progress" else "left")
    for j in jobs:
        progress = f"{j['progress'] * 100:.0f}%" + (f" {j['stage']}" if j["stage"] and j["status"] == "running" else "")
        table.add_row(
            j["id"],
            j["model"],
            j["variant"],
            j["recipe"],
            j["status"],
            progress,
            j["started_at"] or "-",
            j["finished_at"] or "-",
            j["message"],
        )
    console.print(table)


@jobs_app.command("cancel")
def cancel(
    job_id: str = typer.Argument(..., help="The job's id (from `slimctl jobs` or `slimctl optimize`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the job's record as JSON."),
) -> None:
    """Cancel a queued or running job: its worker is ended and nothing of it is registered."""
    try:
        with connect() as client:
            record = client.cancel_job(job_id)
    except SlimServeClientError as e:
        fail(str(e))
    if as_json:
        print_json(record)
        return
    console.print(f"job {record['id']} ({record['model']}: {record['variant']}) {record['status']}")


def interrupted(job_id: str, cancel_without_asking: bool) -> None:
    """Ctrl-C on `slimctl optimize`: cancel the job (asked on a terminal, or at once with --cancel-on-interrupt) or leave it running."""
    if not job_id:
        fail("interrupted before the server queued the job: nothing was started")
    if not cancel_without_asking:
        if not sys.stdin.isatty():
            err.print(f"interrupted: job {job_id} goes on in the server; cancel it with `slimctl jobs cancel {job_id}`")
            raise typer.Exit(130)
        try:
            cancel_without_asking = typer.confirm(f"\ncancel job {job_id}?", default=False)
        except (KeyboardInterrupt, typer.Abort):
            cancel_without_asking = True  # a second Ctrl-C
        if not cancel_without_asking:
            err.print(f"job {job_id} goes on in the server: follow it with `slimctl jobs`")
            raise typer.Exit(130)
    try:
        with connect() as client:
            record = client.cancel_job(job_id)
    except SlimServeClientError as e:
        fail(f"interrupted; cancelling job {job_id} failed: {e}")
    err.print(f"job {record['id']} {record['status']}: nothing was registered")
    raise typer.Exit(130)
