"""What every `slimctl` command shares: the connection options given before the command, the consoles,
and the formatting of numbers, sizes and shapes; errors end the command with `fail`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from slimserve.client.client import SlimServeClient, SlimServeClientError

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
