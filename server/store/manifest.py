"""What a model is on record: its manifest (`ModelInfo` with its `VariantInfo`s, versioned by SCHEMA_VERSION), and
the rules for what a model may hold: names, model file formats, and dataset .npz files that match its inputs."""

from __future__ import annotations

import datetime as dt
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.optimizer.base import DEFAULT_RUNTIME as RUNTIME_OF_FORMAT  # noqa: F401  (the one format -> runtime map)
from slimserve.server.errors import FailedPrecondition, InvalidArgument
from slimserve.server.runtimes import TensorSpec
from slimserve.server.store.traffic import TrafficPolicy

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
DATA_ROLES = ("data", "train", "calibration")
MODEL_FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
BASELINE = "baseline"


def validate_name(name: str, what: str = "model name") -> str:
    if not name:
        raise InvalidArgument(f"{what} is empty")
    if not NAME_RE.match(name) or ".." in name:
        raise InvalidArgument(
            f"{what} '{name[:80]}' is not allowed: use 1-64 letters, digits, '_', '-', '+' or '.', "
            "starting with a letter or digit, with no '..'"
        )
    return name


def model_format(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    fmt = MODEL_FORMATS.get(suffix)
    if fmt is None:
        raise InvalidArgument(
            f"model file '{Path(filename).name}' is not supported: slimserve accepts ONNX (.onnx) "
            "and torch.export archives (.pt2); export the model with torch.onnx.export or torch.export.save"
        )
    return fmt


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class VariantInfo:
    """A variant's record: what it is, where it runs, and its evaluation (None where not measured)."""

    name: str
    recipe: str
    parent: str
    runtime: str
    format: str
    status: str = "ready"  # ready | failed
    message: str = ""
    created_at: str = field(default_factory=now)
    file: str = ""
    size_bytes: int = 0
    evaluation: dict[str, Any] = field(default_factory=dict)
    # Triton's integer model version: 1 = the baseline, then in order of creation, never reused (0: not given yet).
    version: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantInfo:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ModelInfo:
    name: str
    format: str
    description: str
    created_at: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    datasets: list[str]
    variants: dict[str, VariantInfo]
    # How live traffic is split between variants; persisted so that a restart keeps it.
    traffic: TrafficPolicy = field(default_factory=TrafficPolicy.single)
    # Optimization jobs by id: variant, recipe, status (queued | running | succeeded | failed | cancelled | interrupted), message, times.
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The highest version ever given to a variant of this model: a deleted variant's number is never reused.
    last_version: int = 0
    schema_version: int = SCHEMA_VERSION
    # The model's rollout (server/rollout/state.py), running or finished; None when it never had one.
    rollout: dict[str, Any] | None = None
    # Quality settings given at register, for every optimization job that sets none: "OUTPUT=METRIC", an evaluator's name.
    quality: list[str] = field(default_factory=list)
    evaluator: str = ""
    # The model's latency objective and its steering history (server/rollout/slo_controller.py); None: no SLO.
    slo: dict[str, Any] | None = None
    # The sequence axis declared at register ({"inputs": [...], "mask": name}; batching/sequence.py); None: detected by name.
    sequence: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.assign_versions()

    def assign_versions(self) -> None:
        """Versions for variants without one (manifests written before versions existed, a new variant): the
        baseline first, then in order of creation."""
        self.last_version = max([self.last_version, *(v.version for v in self.variants.values())])
        unnumbered = [v for v in self.variants.values() if not v.version]
        for v in sorted(unnumbered, key=lambda v: (v.name != BASELINE, v.created_at)):  # stable: manifest order breaks ties
            self.last_version += 1
            v.version = self.last_version

    def add_variant(self, variant: VariantInfo) -> None:
        """Records a new variant under the next version number."""
        variant.version = 0
        self.variants[variant.name] = variant
        self.assign_versions()

    def variant_named(self, ref: str) -> str:
        """The variant a `model_version` names: a variant name, or its integer version; `ref` itself when neither."""
        if ref in self.variants or not ref.isdigit():
            return ref
        number = int(ref)
        return next((name for name, v in self.variants.items() if v.version == number), ref)

    @property
    def default_variant(self) -> str:
        """The primary variant with the largest share (ties: the baseline, then by name)."""
        weights = self.traffic.weights
        return min(weights, key=lambda v: (-weights[v], v != BASELINE, v)) if weights else BASELINE

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "format": self.format,
            "description": self.description,
            "created_at": self.created_at,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "datasets": list(self.datasets),
            "traffic": self.traffic.to_dict(),
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "jobs": self.jobs,
            "last_version": self.last_version,
            **({"rollout": self.rollout} if self.rollout is not None else {}),
            **({"quality": list(self.quality)} if self.quality else {}),
            **({"evaluator": self.evaluator} if self.evaluator else {}),
            **({"slo": self.slo} if self.slo is not None else {}),
            **({"sequence": self.sequence} if self.sequence is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise FailedPrecondition(
                f"manifest of '{d.get('name')}' has schema_version {d.get('schema_version')}, expected {SCHEMA_VERSION}"
            )
        return cls(
            name=d["name"],
            format=d["format"],
            description=d.get("description", ""),
            created_at=d["created_at"],
            inputs=[TensorSpec.from_dict(s) for s in d["inputs"]],
            outputs=[TensorSpec.from_dict(s) for s in d["outputs"]],
            datasets=list(d.get("datasets", [])),
            variants={k: VariantInfo.from_dict(v) for k, v in d["variants"].items()},
            # Manifests written before routing existed name one default variant instead.
            traffic=TrafficPolicy.from_dict(d["traffic"]) if "traffic" in d else TrafficPolicy.single(d.get("default_variant", BASELINE)),
            jobs=dict(d.get("jobs", {})),
            last_version=int(d.get("last_version", 0)),
            rollout=d.get("rollout"),
            quality=list(d.get("quality", [])),
            evaluator=str(d.get("evaluator", "")),
            slo=d.get("slo"),
            sequence=d.get("sequence"),
        )


def inspect_npz(path: Path, role: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Opens an .npz without pickle and returns {array: (dtype, shape)}; refuses object arrays."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as e:
        raise InvalidArgument(f"{role} file is not a plain .npz (object arrays need pickle, which slimserve never loads): {e}") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise InvalidArgument(f"{role} file is not a readable .npz archive: {e}") from e
    if not arrays:
        raise InvalidArgument(f"{role} file holds no arrays")
    return {k: (str(v.dtype), tuple(v.shape)) for k, v in arrays.items()}


def check_dataset(role: str, arrays: dict[str, tuple[str, tuple[int, ...]]], inputs: list[TensorSpec]) -> None:
    """A dataset must hold one array per model input and optionally `labels`, by the .npz convention of
    slimserve.optimizer.data: samples on each input's batch axis (its first variable dimension, or the 1 of a fixed
    batch), one value for an input that takes one per model (a 0-d sample rate)."""
    from slimserve.optimizer.data import PER_MODEL, batch_axis

    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise InvalidArgument(
            f"{role} .npz has no array for input {', '.join(repr(m) for m in missing)} "
            f"(it holds: {', '.join(sorted(arrays))}); name one array per model input, plus 'labels'"
        )
    counts = {}
    for spec in inputs:
        shape, axis = arrays[spec.name][1], batch_axis(tuple(spec.shape))
        if axis is PER_MODEL:
            if len(shape) != len(spec.shape) or any(d != -1 and d != s for d, s in zip(spec.shape, shape)):
                raise InvalidArgument(
                    f"{role} .npz array '{spec.name}' has shape {list(shape)}; input '{spec.name}' takes one value per model, "
                    f"{spec.describe()}, sent with every request: store that one value (np.array(VALUE) for a scalar)"
                )
            continue
        fits = len(shape) == len(spec.shape) and all(i == axis or d == -1 or d == s for i, (d, s) in enumerate(zip(spec.shape, shape)))
        if not fits:
            where = f" (samples on axis {axis})" if axis else ""
            raise InvalidArgument(f"{role} .npz array '{spec.name}' has shape {list(shape)}, the model expects {spec.describe()}{where}")
        counts[spec.name] = shape[axis]
    if "labels" in arrays:
        counts["labels"] = arrays["labels"][1][0] if arrays["labels"][1] else 0
    if len(set(counts.values())) > 1:
        raise InvalidArgument(f"{role} .npz arrays disagree on the number of samples: {counts}")
