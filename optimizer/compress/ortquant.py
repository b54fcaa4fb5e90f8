"""What the ONNX Runtime quantization passes share: quant types, op-type checks, the calibration reader, and pre-processing.

ORT's pre-processing runs in a child process (`python -m slimserve.optimizer.compress.ortquant SOURCE TARGET`) whose working
directory is a scratch folder: ORT's symbolic shape inference dumps a model and a uuid-named copy of its
weights into the cwd whenever it gives up.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slimserve.optimizer.base import OptimizerError, PassContext, ProgressEvent

QUANT_TYPES = ("qint8", "quint8")
# The folder that holds the optimizer package, so that the child imports this very code.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


# CPU flags of the INT8 dot-product instructions ORT's MLAS kernels use, fastest first.
_INT8_FLAGS = (
    ("amx_int8", "AMX"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("i8mm", "Arm I8MM"),
    ("asimddp", "Arm SDOT"),
)


# The vector instruction sets that decide ORT's CPU kernels, in the order a report names them.
_ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("fma", "FMA"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_int8", "AMX-INT8"),
    ("amx_bf16", "AMX-BF16"),
    ("asimd", "NEON"),
    ("asimddp", "Arm SDOT"),
    ("i8mm", "Arm I8MM"),
    ("sve", "SVE"),
)


def _cpuinfo_fields(cpuinfo: Path) -> tuple[set[str], str]:
    """The first processor's flags and model name from /proc/cpuinfo (empty when it cannot be read)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set(), ""
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), [])
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith(("model name", "Model", "CPU part"))), "")
    return set(flags), model


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The node's CPU and the instruction sets ORT's kernels use there, e.g. "AMD EPYC 7B13: AVX2, FMA" (what an
    optimization was timed on: the same file can pick another variant on a node with VNNI or AMX)."""
    flags, model = _cpuinfo_fields(cpuinfo)
    if not flags:
        return f"{platform.machine() or 'unknown CPU'} (no /proc/cpuinfo flags)"
    found = [label for flag, label in _ISA_FLAGS if flag in flags]
    return f"{model or platform.machine()}: {', '.join(found) or 'no AVX2 / AVX-512 / AMX / NEON'}"


def int8_kernels(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Which INT8 kernels ONNX Runtime's CPU provider runs on this machine, from the CPU's flags."""
    try:
        flags = set(
            next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))), [])
        )
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    found = [label for flag, label in _INT8_FLAGS if flag in flags]
    if found:
        return f"{' + '.join(found)} INT8 dot products"
    if "avx2" in flags:
        return "AVX2 without VNNI: U8S8 products may saturate (consider reduce_range)"
    return "no INT8 dot-product instructions found (no VNNI / AMX / SDOT)"


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[name]


def check_op_types(op_types: tuple[str, ...], known: set[str], needed_by: str) -> list[str] | None:
    unknown = sorted(set(op_types) - known)
    if unknown:
        raise OptimizerError(f"{needed_by}: op_types {', '.join(unknown)} cannot be quantized (choose from {', '.join(sorted(known))})")
    return list(op_types) or None


def calibration_batches(rows: int, batch: int, fixed_batch: bool, equal: bool) -> list[tuple[int, int]]:
    """The (start, stop) row ranges the calibrator is fed, `batch` rows at a time.

    fixed_batch: the model fixes its batch, so only whole batches of `batch`. equal: every batch the same size
    (ORT's histogram calibrators, entropy and percentile, stack each batch's outputs into one array and fail on
    a shorter last batch: "setting an array element with a sequence"), so the rows are split into
    ceil(rows / batch) equal batches and fewer than that many rows are left out.
    """
    if fixed_batch:
        return [(i, i + batch) for i in range(0, rows - batch + 1, batch)]
    if equal:
        count = -(-rows // batch)
        size = rows // count
        return [(i * size, (i + 1) * size) for i in range(count)]
    return [(i, min(i + batch, rows)) for i in range(0, rows, batch)]


def calibration_reader(arrays: dict[str, np.ndarray], batch: int, fixed_batch: bool, equal: bool = False, shapes: dict | None = None):
    """Feeds the arrays to ORT's calibrator in the row ranges of `calibration_batches`.

    shapes: the model's input shapes where the arrays are sample-major (slimserve.optimizer.data.samples_first):
    each batch goes back to the model's layout (a state on axis 1, a scalar input once).
    """
    from onnxruntime.quantization import CalibrationDataReader

    from slimserve.optimizer.data import model_layout

    rows = len(next(iter(arrays.values())))
    ranges = calibration_batches(rows, batch, fixed_batch, equal)

    class ArrayReader(CalibrationDataReader):
        def __init__(self) -> None:
            rows = [{k: v[a:b] for k, v in arrays.items()} for a, b in ranges]
            self._batches: Iterator[dict[str, np.ndarray]] = iter([model_layout(r, shapes) if shapes else r for r in rows])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return ArrayReader()


def preprocess(source: Path, target: Path, context: PassContext, needed_by: str) -> Path:
    """ORT's quant_pre_process (symbolic + ONNX shape inference, graph clean-up), dropping the steps that fail.

    Returns `target`, or `source` when every attempt failed (quantization then runs without it).
    """
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        child = subprocess.run(
            [sys.executable, "-m", "slimserve.optimizer.compress.ortquant", str(source.resolve()), str(target.resolve())],
            check=False,
            cwd=scratch,
            capture_output=True,
            text=True,
            env=_child_env(),
        )
    lines = child.stdout.strip().splitlines()
    try:
        outcome = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        outcome = {"done": None, "errors": [f"the pre-processing process exited with {child.returncode}: {child.stderr.strip()[-300:]}"]}
    if outcome["done"] is None or not target.is_file():
        context.progress(ProgressEvent(stage=needed_by, message=f"pre-processing skipped ({'; '.join(outcome['errors'])})"))
        return source
    if outcome["errors"]:
        skipped = ", ".join(k.removeprefix("skip_").replace("_", " ") for k in outcome["done"])
        context.progress(ProgressEvent(stage=needed_by, message=f"pre-processing without {skipped} ({outcome['errors'][0]})"))
    return target


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": _PACKAGE_ROOT + (os.pathsep + path if path else "")}


def main(argv: list[str]) -> None:
    """The child: quant_pre_process with fewer steps after each failure; prints the outcome as one JSON line."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = argv[0], argv[1]
    errors = []
    for kwargs in ({}, {"skip_symbolic_shape": True}, {"skip_symbolic_shape": True, "skip_optimization": True}):
        try:
            quant_pre_process(source, target, **kwargs)
            print(json.dumps({"done": kwargs, "errors": errors}))
            return
        except Exception as e:  # ORT raises assorted types; the next attempt drops the failing step
            errors.append(f"{type(e).__name__}: {e}".splitlines()[0])
    print(json.dumps({"done": None, "errors": errors}))


if __name__ == "__main__":
    main(sys.argv[1:])
