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

from slimserve.optimizer.base import UnsafeArchiveError
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
    role: str  # model | data | train | calibration
    filename: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class UploadHeader:
    name: str
    files: tuple[UploadFile, ...]
    description: str = ""
    # A declared sequence axis ({"inputs": [...], "mask": name}, server/batching/sequence.py); None: detected by name.
    sequence: dict | None = None


def check_header(header: UploadHeader, max_bytes: int) -> None:
    validate_name(header.name)
    roles = [f.role for f in header.files]
    if roles.count("model") != 1:
        raise InvalidArgument(f"an upload carries exactly one 'model' file; this one has {roles.count('model')}")
    for f in header.files:
        if f.role not in ("model", *DATA_ROLES):
            raise InvalidArgument(f"file '{f.filename}' has role '{f.role}'; roles are model, {', '.join(DATA_ROLES)}")
        if roles.count(f.role) > 1:
            raise InvalidArgument(f"role '{f.role}' appears {roles.count(f.role)} times; send one file per role")
        if f.role == "model":
            model_format(f.filename)
        elif Path(f.filename).suffix.lower() != ".npz":
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


def check_onnx(path: Path, filename: str) -> None:
    """Parses and checks the graph before anything runs it; refuses weights in side files."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise InvalidArgument(f"'{filename}' is not a valid ONNX model: {e}") from e
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise InvalidArgument(
                f"'{filename}' keeps weights in a side file ('{location}'); re-export with the weights inside "
                "(torch.onnx.export(..., external_data=False) or onnx.save(model, path, save_as_external_data=False))"
            )
    try:
        onnx.checker.check_model(model)
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

        if fmt == "onnx":
            check_onnx(target, model_file.filename)
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

        if header.sequence is not None:
            check_sequence(header.sequence, runtime.inputs, {f.role: paths[i] for i, f in enumerate(header.files) if f.role != "model"})
        datasets = []
        (model_dir / "data").mkdir()
        for i, f in enumerate(header.files):
            if f.role == "model":
                continue
            check_dataset(f.role, inspect_npz(paths[i], f.role), runtime.inputs)
            shutil.move(paths[i], model_dir / "data" / f"{f.role}.npz")
            datasets.append(f.role)

        info = ModelInfo(
            name=header.name,
            format=fmt,
            description=header.description,
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
                    size_bytes=target.stat().st_size,
                )
            },
        )
        return self.repository.add_model(model_dir, info)
