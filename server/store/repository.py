"""The model repository: a directory of models, each with a manifest and its variants, written atomically.

Layout under the root:
    models/<name>/manifest.json              the model's record and its variants
    models/<name>/variants/<variant>/model.onnx | model.pt2
    models/<name>/data/<role>.npz            data, train, calibration
    models/<name>/serving.json               serving settings applied at every load (a Triton config, its label files)
    .staging/<uuid>/                         uploads and variants being built; cleared at start

Every write goes to a temporary path, is flushed, then renamed into place, so a crash never
leaves half a model where a reader can see it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimserve.server.errors import AlreadyExists, FailedPrecondition, NotFound
from slimserve.server.store.manifest import BASELINE, ModelInfo, VariantInfo, now, validate_name
from slimserve.server.store.traffic import without_variant

log = logging.getLogger(__name__)
SERVING = "serving.json"
TRACE = "trace.json"  # Triton's trace settings: the server's at the root, a model's own beside its manifest


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file, fsync and rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class Repository:
    """The embedded, directory-backed repository. Thread-safe; one process writes a root at a time.

    With `read_only`, a process serves what another (the writer) keeps in the same directory, as
    replicas on shared storage do: it never recovers, stages or writes, and every write raises
    FailedPrecondition naming the writer's role; slimserve.server.management.watch.RepositoryWatcher picks changes up.
    """

    def __init__(self, root: str | Path, read_only: bool = False) -> None:
        self.root = Path(root).resolve()
        self.models_dir = self.root / "models"
        self.staging_dir = self.root / ".staging"
        self.read_only = read_only
        self._lock = threading.RLock()
        self._lock_file = None  # the writer lock's open file, held for the process's life
        if read_only:
            if not self.models_dir.is_dir():
                log.warning("repository %s has no models yet: serving nothing until its writer adds some", self.root)
            return
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_writer_lock()
        self._recover()

    def _take_writer_lock(self):
        """One writer per directory: a second would clear the first's staged writes at start."""
        handle = open(self.root / ".writer.lock", "a+")  # noqa: SIM115  the writer lock is held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FailedPrecondition(
                f"repository {self.root} is in use by another slimserve; give each server its own repository, "
                "or start the others with --read-only to serve it as replicas"
            ) from None
        return handle

    def close(self) -> None:
        """Releases the writer lock (the process exiting releases it too)."""
        handle = self._lock_file
        if handle is not None:
            handle.close()
            self._lock_file = None

    def check_writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition(
                "this server is a read-only replica of a shared repository (--read-only): "
                "register, optimize, route and delete through the writer replica"
            )

    def _recover(self) -> None:
        """Clears what a crash left: staged uploads, half-renamed deletions, stray temp files."""
        for leftover in self.staging_dir.iterdir():
            log.info("removing unfinished write %s", leftover.name)
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for model_dir in self.models_dir.iterdir():
            for tmp in [*model_dir.glob(".*.tmp"), *model_dir.glob("variants/*/.*.tmp")]:  # also a kept thread count's
                tmp.unlink(missing_ok=True)
            if not (model_dir / "manifest.json").exists():
                log.warning("removing %s: it has no manifest (an interrupted write)", model_dir)
                shutil.rmtree(model_dir, ignore_errors=True)
                continue
            self._recover_model(model_dir.name)

    def _recover_model(self, name: str) -> None:
        """Variant directories the manifest does not know were never committed; queued and running jobs died with us (interrupted)."""
        info = self.get(name)
        variants_dir = self.model_dir(name) / "variants"
        for variant_dir in variants_dir.iterdir() if variants_dir.exists() else ():
            if variant_dir.name not in info.variants:
                log.warning("removing %s: a variant that was never recorded (an interrupted job)", variant_dir)
                shutil.rmtree(variant_dir, ignore_errors=True)
        if any(j["status"] in ("queued", "running") for j in info.jobs.values()):

            def interrupt(i: ModelInfo) -> None:
                for job in i.jobs.values():
                    if job["status"] in ("queued", "running"):
                        was = job["status"]
                        job.update(
                            status="interrupted", message=f"interrupted: the server stopped while the job was {was}", finished_at=now()
                        )

            self.update(name, interrupt)

    # ------------------------------------------------------------------ reads

    def names(self) -> list[str]:
        if not self.models_dir.is_dir():  # a read-only replica started before its writer
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if (p / "manifest.json").exists())

    def get(self, name: str) -> ModelInfo:
        validate_name(name)
        path = self.models_dir / name / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"Request for unknown model: '{name}' is not registered") from None
        return ModelInfo.from_dict(data)

    def list(self) -> list[ModelInfo]:
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except NotFound:
                continue  # deleted between listing and reading
        return out

    def model_dir(self, name: str) -> Path:
        return self.models_dir / validate_name(name)

    def variant_dir(self, model: str, variant: str) -> Path:
        """The directory of one variant: its model file and the side files its runtime reads."""
        return self.model_dir(model) / "variants" / variant

    def variant_path(self, info: ModelInfo, variant: str) -> Path:
        """The model file of a variant of `info` (the one place that builds it)."""
        v = info.variants.get(variant)
        if v is None:
            raise NotFound(f"model '{info.name}' has no variant '{variant}' (variants: {', '.join(info.variants)})")
        return self.variant_dir(info.name, variant) / v.file

    def dataset_path(self, model: str, role: str) -> Path | None:
        path = self.model_dir(model) / "data" / f"{role}.npz"
        return path if path.exists() else None

    # ------------------------------------------------------------------ writes

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory for a write in progress; removed afterwards whatever happens."""
        self.check_writable()
        path = self.staging_dir / uuid.uuid4().hex
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def add_model(self, staged: Path, info: ModelInfo) -> ModelInfo:
        """Moves a fully written model directory into place with one rename, then it is visible."""
        self.check_writable()
        validate_name(info.name)
        (staged / "manifest.json").write_text(json.dumps(info.to_dict(), indent=2))
        fsync_tree(staged)
        with self._lock:
            target = self.models_dir / info.name
            if target.exists():
                raise AlreadyExists(f"model '{info.name}' is already registered; delete it first or pick another name")
            os.rename(staged, target)
            fsync_dir(self.models_dir)
        return info

    def delete(self, name: str) -> None:
        """Renames the model out of sight first, so a crash mid-delete leaves it gone, not half-gone."""
        self.check_writable()
        with self._lock:
            target = self.model_dir(name)
            if not (target / "manifest.json").exists():
                raise NotFound(f"Request for unknown model: '{name}' is not registered")
            grave = self.staging_dir / f"deleted-{uuid.uuid4().hex}"
            os.rename(target, grave)
            fsync_dir(self.models_dir)
        shutil.rmtree(grave, ignore_errors=True)

    def update(self, name: str, change: Any) -> ModelInfo:
        """Applies `change(info)` to a model's manifest under the lock and writes it atomically."""
        self.check_writable()
        with self._lock:
            info = self.get(name)
            change(info)
            atomic_write_bytes(self.model_dir(name) / "manifest.json", json.dumps(info.to_dict(), indent=2).encode())
            return info

    def serving(self, name: str) -> dict[str, Any] | None:
        """The serving settings stored with a model (`serving.json`: a load `config` as JSON, its label files base64 by
        `file:<name>`, and where it was imported from), applied at every load; None when it has none."""
        path = self.model_dir(name) / SERVING
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def set_serving(self, name: str, serving: dict[str, Any] | None) -> None:
        """Stores (or with None removes) a model's serving settings, atomically."""
        self.check_writable()
        path = self.model_dir(name) / SERVING
        with self._lock:
            if serving is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, json.dumps(serving, indent=2, sort_keys=True).encode())

    def trace_settings(self, name: str = "") -> dict[str, Any] | None:
        """The trace settings stored for the server (name "") or a model's own; None when there are none."""
        path = (self.model_dir(name) if name else self.root) / TRACE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def set_trace_settings(self, settings: dict[str, Any] | None, name: str = "") -> None:
        """Stores (or with None removes) the server's trace settings (name "") or a model's own, atomically; a model's
        go with it when it is deleted."""
        self.check_writable()
        path = (self.model_dir(name) if name else self.root) / TRACE
        with self._lock:
            if settings is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, json.dumps(settings, indent=2, sort_keys=True).encode())

    def add_variant(self, model: str, staged_dir: Path, variant: VariantInfo) -> ModelInfo:
        """Moves a staged variant directory (holding `variant.file`) in, then records it in the manifest."""
        self.check_writable()
        validate_name(variant.name, "variant name")
        with self._lock:
            info = self.get(model)
            if variant.name in info.variants:
                raise AlreadyExists(f"model '{model}' already has a variant '{variant.name}'; pick another --name")
            fsync_tree(staged_dir)
            target = self.variant_dir(model, variant.name)
            if target.exists():  # a directory without a manifest entry: left by a crash
                shutil.rmtree(target)
            os.rename(staged_dir, target)
            fsync_dir(target.parent)

            def record(i: ModelInfo) -> None:
                i.add_variant(variant)

            return self.update(model, record)

    def remove_variant(self, model: str, variant: str) -> ModelInfo:
        self.check_writable()
        if variant == BASELINE:
            raise FailedPrecondition(f"the baseline of '{model}' cannot be removed; delete the model instead")
        with self._lock:

            def drop(i: ModelInfo) -> None:
                if variant not in i.variants:
                    raise NotFound(f"model '{model}' has no variant '{variant}'")
                i.traffic = without_variant(i.traffic, variant)
                del i.variants[variant]

            info = self.update(model, drop)
            shutil.rmtree(self.variant_dir(model, variant), ignore_errors=True)
            return info
