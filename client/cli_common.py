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


def float64_note(array_name: str, source: str, datatype: str, dtype: Any) -> str | None:
    """The note `register` and `infer` both give for a float64 array of an FP32 input, which they cast (None: nothing to say)."""
    if datatype == "FP32" and str(dtype) == "float64":
        return f"note: '{array_name}' in {source} is float64; cast to the model's FP32 (save it as float32 to skip this)"
    return None


def cast_float64(arrays: dict[str, Any], inputs: Any, source: str) -> dict[str, Any]:
    """`infer`'s side of the rule: float64 arrays of FP32 inputs are cast, with the same note as `register`."""
    out = dict(arrays)
    for spec in inputs:
        array = out.get(spec.name)
        note = None if array is None else float64_note(spec.name, source, spec.datatype, array.dtype)
        if note:
            err.print(note, markup=False, highlight=False)
            out[spec.name] = array.astype("float32")
    return out


def npz_dtypes(path: Path) -> dict[str, str]:
    """Each array's dtype in an .npz, read from the headers without loading the arrays."""
    import zipfile

    import numpy as np

    dtypes = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                dtypes[info.filename[:-4]] = str(read(f)[2])
    return dtypes
