"""Registration: a chunked upload becomes a validated model in the repository, or nothing at all."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from slimserve.optimizer.base import OptimizerError, UnsafeArchiveError
from slimserve.optimizer.evaluation.evaluators import load_evaluator
from slimserve.optimizer.evaluation.quality import parse_declared
from slimserve.optimizer.formats.onnx_files import check_location, external_locations, missing_side_files
from slimserve.optimizer.formats.sequence_axis import declaration_problem, mask_problem
from slimserve.server.errors import InvalidArgument
from slimserve.server.runtimes import RuntimeConfig, TensorSpec, create_runtime
from slimserve.server.store.manifest import (
    BASELINE,
    DATA_ROLES,
    RUNTIME_OF_FORMAT,
    ModelInfo,
    VariantInfo,
    check_dataset,
    inspect_npz,
    model_format,
    now,
    validate_name,
)
from slimserve.server.store.repository import Repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadFile:
    role: str  # model | data | train | calibration | label (an output's label file, named as config_json's label_filename)
    filename: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class UploadHeader:
    name: str
    files: tuple[UploadFile, ...]
    description: str = ""
    quality: tuple[str, ...] = ()  # "OUTPUT=METRIC" per output, kept with the model for its jobs
    evaluator: str = ""  # an installed evaluator's name, kept with the model for its jobs
    config_json: str = ""  # serving settings stored with the model (Triton's ModelConfig as JSON); "" for none
    # A declared sequence axis ({"inputs": [...], "mask": name}, server/batching/sequence.py); None: detected by name.
    sequence: dict | None = None


# A side file of an ONNX model (its `external_data` location, relative to the model): as many as the model names.
EXTERNAL = "external"


def check_header(header: UploadHeader, max_bytes: int) -> None:
    validate_name(header.name)
    roles = [f.role for f in header.files]
    if roles.count("model") != 1:
        raise InvalidArgument(f"an upload carries exactly one 'model' file; this one has {roles.count('model')}")
    for f in header.files:
        if f.role == "label":
            if not header.config_json:
                raise InvalidArgument(
                    f"label file '{f.filename}' needs a config (--config or --labels) whose output names it as label_filename"
                )
            if "/" in f.filename or f.filename.startswith("."):
                raise InvalidArgument(f"label file name '{f.filename}' must be a plain file name")
            continue
        if f.role not in ("model", EXTERNAL, *DATA_ROLES):
            raise InvalidArgument(f"file '{f.filename}' has role '{f.role}'; roles are model, {EXTERNAL}, label, {', '.join(DATA_ROLES)}")
        if f.role == EXTERNAL:
            try:
                check_location(f.filename)
            except OptimizerError as e:
                raise InvalidArgument(f"{EXTERNAL} file: {e}") from e
            if [g.filename for g in header.files if g.role == EXTERNAL].count(f.filename) > 1:
                raise InvalidArgument(f"{EXTERNAL} file '{f.filename}' appears twice; send each side file once")
        elif roles.count(f.role) > 1:
            raise InvalidArgument(f"role '{f.role}' appears {roles.count(f.role)} times; send one file per role")
        if f.role == "model":
            model_format(f.filename)
        elif f.role in DATA_ROLES and Path(f.filename).suffix.lower() != ".npz":
            raise InvalidArgument(f"{f.role} file '{f.filename}' must be an .npz with one array per model input (and 'labels')")
        if len(f.sha256) != 64:
            raise InvalidArgument(f"file '{f.filename}': sha256 must be 64 hex digits")
    total = sum(f.size_bytes for f in header.files)
    if total > max_bytes:
        raise InvalidArgument(f"upload of {total} bytes exceeds the server's limit of {max_bytes} bytes (--max-upload-bytes)")


def check_sequence(sequence: dict, inputs: list[TensorSpec], datasets: dict[str, Path]) -> None:
    """A declared sequence axis fits the model's inputs, and the datasets' masks are 0/1 trailing padding; else the
    registration is refused with the input and its shape (registered without the declaration, the model serves padded)."""
    names, mask = list(sequence.get("inputs") or ()), str(sequence.get("mask") or "")
    problem = declaration_problem({s.name: (s.datatype, s.shape) for s in inputs}, names, mask)
    if problem:
        raise InvalidArgument(f"sequence declaration refused: {problem}")
    for role, path in datasets.items():
        with np.load(path, allow_pickle=False) as npz:
            if mask in npz.files:
                problem = mask_problem(npz[mask], mask, f"{role}.npz")
                if problem:
                    raise InvalidArgument(
                        f"sequence declaration refused: {problem}; padding-free serving needs masks of ones then zeros "
                        "(register without the declaration to serve the model padded)"
                    )


def check_onnx(path: Path, filename: str, side_files: list[str] | None = None) -> None:
    """Parses and checks the graph before anything runs it; every side file it names must be among `side_files`, whole."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise InvalidArgument(f"'{filename}' is not a valid ONNX model: {e}") from e
    try:
        named = external_locations(path)
        for location in named:
            check_location(location)
    except OptimizerError as e:
        raise InvalidArgument(f"'{filename}': {e}") from e
    sent = side_files or []
    missing = [loc for loc in named if loc not in sent]
    if missing:
        raise InvalidArgument(
            f"'{filename}' keeps weights in side files the upload does not carry: {', '.join(repr(m) for m in missing)}; "
            "keep them beside the model file (slimctl register sends the files the model names), or re-export with the "
            "weights inside (torch.onnx.export(..., external_data=False))"
        )
    unused = [loc for loc in sent if loc not in named]
    if unused:
        raise InvalidArgument(f"side files {', '.join(repr(u) for u in unused)} were sent, but '{filename}' names no such file")
    short = missing_side_files(path)
    if short:
        raise InvalidArgument(f"'{filename}': {'; '.join(short)}; send the side file torch.onnx.export wrote with the model")
    try:
        onnx.checker.check_model(str(path) if named else model)  # a path: side files resolve beside the model
    except onnx.checker.ValidationError as e:
        raise InvalidArgument(f"'{filename}' fails the ONNX checker: {str(e).splitlines()[0]}") from e


class Registrar:
    """Receives uploads into the repository's staging area and commits them with one rename."""

    def __init__(self, repository: Repository, runtime_config: RuntimeConfig, max_upload_bytes: int) -> None:
        self.repository = repository
        self.runtime_config = runtime_config
        self.max_upload_bytes = max_upload_bytes

    async def receive(self, header: UploadHeader, chunks: AsyncIterator[tuple[int, bytes]], staged: Path) -> list[Path]:
        """Writes each file's chunks to `staged`, checking order, size and SHA-256."""
        paths = [staged / f"upload-{i}{Path(f.filename).suffix.lower()}" for i, f in enumerate(header.files)]
        handles = [open(p, "wb") for p in paths]  # noqa: SIM115, ASYNC230  closed in the finally below; creating empty files does not block
        written = [0] * len(paths)
        digests = [hashlib.sha256() for _ in paths]
        current = 0
        try:
            async for index, data in chunks:
                if index >= len(paths):
                    raise InvalidArgument(f"chunk for file #{index}, but the header lists {len(paths)} files")
                if index < current:
                    raise InvalidArgument(f"chunk for file #{index} after file #{current} began; send files in order")
                current = index
                written[index] += len(data)
                if written[index] > header.files[index].size_bytes:
                    raise InvalidArgument(
                        f"file '{header.files[index].filename}' is longer than the {header.files[index].size_bytes} bytes its header declared"
                    )
                handles[index].write(data)
                digests[index].update(data)
        finally:
            for h in handles:
                h.flush()
                h.close()
        for f, n, d in zip(header.files, written, digests):
            if n != f.size_bytes:
                raise InvalidArgument(f"upload ended after {n} of {f.size_bytes} bytes of '{f.filename}'")
            if d.hexdigest() != f.sha256.lower():
                raise InvalidArgument(f"file '{f.filename}' arrived corrupted: SHA-256 {d.hexdigest()} != {f.sha256}")
        return paths

    def commit(self, header: UploadHeader, paths: list[Path], staged: Path) -> ModelInfo:
        """Validates the received files and moves them into the repository (blocking: run on a thread)."""
        model_index = next(i for i, f in enumerate(header.files) if f.role == "model")
        model_file = header.files[model_index]
        fmt = model_format(model_file.filename)
        model_dir = staged / "model"
        variant_dir = model_dir / "variants" / BASELINE
        variant_dir.mkdir(parents=True)
        target = variant_dir / f"model.{fmt}"
        shutil.move(paths[model_index], target)
        side_files = []
        for i, f in enumerate(header.files):
            if f.role == EXTERNAL:  # beside the model under the name it gives, where ONNX Runtime and onnx.load look
                if fmt != "onnx":
                    raise InvalidArgument(
                        f"side file '{f.filename}' was sent with '{model_file.filename}'; only ONNX models have side files"
                    )
                side = variant_dir / check_location(f.filename)
                side.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(paths[i], side)
                side_files.append(f.filename)

        if fmt == "onnx":
            check_onnx(target, model_file.filename, side_files)
        runtime = create_runtime(RUNTIME_OF_FORMAT[fmt], target, self.runtime_config)
        try:
            runtime.load()
        except UnsafeArchiveError as e:
            raise InvalidArgument(f"'{model_file.filename}' refused: {e}; slimserve never unpickles uploaded files") from e
        except InvalidArgument:
            raise
        except Exception as e:
            kind = "torch.export archive (.pt2)" if fmt == "pt2" else "ONNX model"
            raise InvalidArgument(
                f"'{model_file.filename}' could not be loaded as a {kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from e
        finally:
            runtime.unload()

        try:  # the model's quality settings, checked against its outputs and this node's evaluators
            parse_declared(header.quality, [s.name for s in runtime.outputs])
            if header.evaluator:
                load_evaluator(header.evaluator)
        except OptimizerError as e:
            raise InvalidArgument(str(e)) from e

        if header.sequence is not None:
            check_sequence(header.sequence, runtime.inputs, {f.role: paths[i] for i, f in enumerate(header.files) if f.role in DATA_ROLES})
        datasets = []
        (model_dir / "data").mkdir()
        for i, f in enumerate(header.files):
            if f.role in ("model", EXTERNAL, "label"):
                continue
            check_dataset(f.role, inspect_npz(paths[i], f.role), runtime.inputs)
            shutil.move(paths[i], model_dir / "data" / f"{f.role}.npz")
            datasets.append(f.role)

        info = ModelInfo(
            name=header.name,
            format=fmt,
            description=header.description,
            quality=list(header.quality),
            evaluator=header.evaluator,
            created_at=now(),
            inputs=runtime.inputs,
            outputs=runtime.outputs,
            datasets=sorted(datasets),
            sequence=header.sequence,
            variants={
                BASELINE: VariantInfo(
                    name=BASELINE,
                    recipe="",
                    parent="",
                    runtime=RUNTIME_OF_FORMAT[fmt],
                    format=fmt,
                    file=target.name,
                    size_bytes=target.stat().st_size + sum(f.size_bytes for f in header.files if f.role == EXTERNAL),
                )
            },
        )
        return self.repository.add_model(model_dir, info)
