"""ONNX models whose weights live in side files ("external data", torch.onnx.export's default since torch 2.9).

An initializer with external data names its file in `location` (relative to the model file), with an optional
`offset` and `length`. A model whose weights and graph fit in one protobuf (under 2 GiB) is written as one file,
so that the optimizer's passes and the repository handle one path; a larger one keeps its side files beside it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from slimserve.optimizer.base import OptimizerError

# protobuf refuses to serialize a message of 2 GiB or more; keep room for the graph itself.
SINGLE_FILE_LIMIT = 2 * 1024**3 - 64 * 1024**2
# The intra-op thread count measured for a model file, kept beside it as `<file>.threads.json`
# (server/runtimes/ort_threads.py): a copy of the model takes it along, so the copy is not timed again.
KEPT_THREADS_SUFFIX = ".threads.json"


@dataclass(frozen=True)
class ExternalRef:
    tensor: str
    location: str
    offset: int
    length: int | None


def _tensors(graph: Any) -> Iterator[Any]:
    """Initializers and Constant values of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _tensors(sub)


def external_refs(path: Path) -> list[ExternalRef]:
    """Every tensor of the model stored in a side file, read without loading the weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    refs = []
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        length = entries.get("length")
        refs.append(ExternalRef(tensor.name, entries.get("location", ""), int(entries.get("offset") or 0), int(length) if length else None))
    return refs


def external_locations(path: Path) -> list[str]:
    """The side files the model names, in the order they first appear."""
    return list(dict.fromkeys(r.location for r in external_refs(path)))


def check_location(location: str) -> str:
    """A side file's name as the model gives it: relative, inside the model's folder (no '..', no absolute path)."""
    pure = PurePosixPath(location)
    if not location or pure.is_absolute() or ".." in pure.parts or "\\" in location or location.startswith("~"):
        raise OptimizerError(f"external data location '{location}' must be a relative path inside the model's folder")
    return str(pure)


def missing_side_files(path: Path) -> list[str]:
    """Side files the model names that are not beside it, or are shorter than a tensor's offset + length needs."""
    problems = []
    for ref in external_refs(path):
        side = path.parent / check_location(ref.location)
        if not side.is_file():
            problems.append(f"'{ref.location}' (weights of '{ref.tensor}') is missing")
        elif ref.length is not None and ref.offset + ref.length > side.stat().st_size:
            problems.append(
                f"'{ref.location}' holds {side.stat().st_size} bytes, and '{ref.tensor}' reads bytes {ref.offset}..{ref.offset + ref.length}"
            )
    return list(dict.fromkeys(problems))


def check_side_files(path: Path, shown_name: str = "") -> None:
    """Raises OptimizerError naming each side file the model needs and lacks."""
    problems = missing_side_files(path)
    if problems:
        raise OptimizerError(
            f"'{shown_name or path.name}' keeps weights in side files, and {'; '.join(problems)}: keep the files "
            f"torch.onnx.export wrote beside the model (same folder, same names)"
        )


def size_with_side_files(path: Path) -> int:
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in external_locations(path))


def single_file(path: Path, workdir: Path) -> Path:
    """The model as one file: `path` itself when it has no side files, else a copy in `workdir` with the weights inside.

    A model of 2 GiB or more cannot be one protobuf: it is returned as it is, side files and all.
    """
    if not external_refs(path):
        return path
    check_side_files(path)
    if size_with_side_files(path) >= SINGLE_FILE_LIMIT:
        return path
    import onnx

    model = onnx.load(str(path))  # reads the side files into the tensors
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / f"{path.stem}-inline.onnx"
    onnx.save(model, str(target), save_as_external_data=False)
    return target


def copy_model(source: Path, target: Path) -> list[Path]:
    """Copies an ONNX model to `target` with the side files it names (kept under their names beside it) and its kept
    thread count; the files written."""
    shutil.copyfile(source, target)
    written = [target]
    for location in external_locations(source):
        side = target.parent / check_location(location)
        side.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.parent / location, side)
        written.append(side)
    kept = source.with_name(source.name + KEPT_THREADS_SUFFIX)
    if kept.is_file():  # keyed by the file's size and digest too, so it holds for the copy
        shutil.copyfile(kept, target.with_name(target.name + KEPT_THREADS_SUFFIX))
        written.append(target.with_name(target.name + KEPT_THREADS_SUFFIX))
    return written
