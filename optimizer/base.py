"""The optimizer's core types: artifacts, pass configs, passes, config checks and dict round trips, and progress events.

A Pass is small: a name, a frozen, versioned config dataclass, and `run(artifact, context) -> artifact`.
Heavy logic lives in plain helper modules (ortquant.py, onnx_graph.py, pruning.py, ...), as in Olive;
slimserve.optimizer.catalog knows the passes by name.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

import numpy as np

# Model file formats an artifact can be in, and the runtime that serves each by default.
FORMATS = ("onnx", "pt2")
DEFAULT_RUNTIME = {"onnx": "onnxruntime", "pt2": "torch"}


class UnsafeArchiveError(ValueError):
    """The archive holds a pickled object that could run code when loaded (here, not in pt2io, so that the server can
    catch it without importing torch: a server of ONNX models never needs it)."""


class OptimizerError(Exception):
    """A pass cannot run as asked: the message says why and what to do (bad config, missing data, ...)."""


class ConfigValueError(OptimizerError, ValueError):
    """A config field holds a value the pass cannot use (a ValueError, so recipes prefix where it came from)."""


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    """A config field that takes one of a few names; an empty choice reads as 'or empty'."""
    if value not in choices:
        named = ", ".join(c for c in choices if c) + (" or empty" if "" in choices else "")
        raise ConfigValueError(f"{field} must be one of {named}, got {value!r}")


def check_fraction(field: str, value: float) -> None:
    """A config field that is a share strictly between 0 and 1 (sparsity, pruning ratio)."""
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ConfigValueError(f"{field} must be in (0, 1), got {value}")


def check_names(field: str, value: tuple[str, ...], what: str = "names") -> None:
    """A config field that lists names (nodes, layers, op types): a tuple of non-empty strings."""
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigValueError(f"{field} must be a list of {what}, got {value!r}")


class Predictor(Protocol):
    """What evaluation needs of a runtime: the server's Runtime objects satisfy it."""

    inputs: list[Any]  # TensorSpec-like: .name, .datatype, .shape
    outputs: list[Any]

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]: ...


# (model file, runtime name) -> a loaded Predictor. The server injects its own runtimes, so that
# the optimizer measures each variant on the runtime that will serve it, without importing the server.
RuntimeFactory = Callable[[Path, str], Predictor]


@dataclass(frozen=True)
class Artifact:
    """A model file plus how it is served. Passes return new artifacts; they never modify their input."""

    path: Path
    format: str  # onnx | pt2
    runtime: str = ""  # onnxruntime | torch | torch-compile | xla; empty: the format's default
    # Names of the served tensors, fixed for all variants of a model so that clients never notice a swap.
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    # Free-form facts a later pass or the evaluation may use (e.g. {"quantized": "int8-static"}).
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise OptimizerError(f"artifact format '{self.format}' is not one of {', '.join(FORMATS)}")
        if not self.runtime:
            object.__setattr__(self, "runtime", DEFAULT_RUNTIME[self.format])

    def derive(self, path: Path, format: str | None = None, runtime: str = "", **notes: str) -> Artifact:
        return Artifact(
            path=Path(path),
            format=format or self.format,
            runtime=runtime,
            input_names=self.input_names,
            output_names=self.output_names,
            notes={**self.notes, **notes},
        )


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a job, streamed to the client: stage, fraction done in [0, 1], and training figures."""

    stage: str
    fraction: float = 0.0
    message: str = ""
    epoch: int | None = None
    loss: float | None = None
    accuracy: float | None = None


@dataclass
class PassContext:
    """What a pass may use besides its input: a scratch directory, the model's datasets, progress."""

    workdir: Path
    datasets: dict[str, Path] = field(default_factory=dict)  # role (data | train | calibration) -> .npz
    progress: Callable[[ProgressEvent], None] = lambda event: None
    seed: int = 0
    device: str = "cpu"
    # Raised by a caller to stop a job between steps (checked by long-running passes).
    cancelled: Callable[[], bool] = lambda: False

    def dataset(self, role: str, needed_by: str) -> dict[str, np.ndarray]:
        """Loads a dataset without pickle, or says which `slimctl register` flag provides it."""
        path = self.datasets.get(role)
        if path is None:
            raise OptimizerError(
                f"{needed_by} needs {role} data, and the model was registered without it; "
                f"register the model again with --{role} {role.upper()}.npz"
            )
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def new_path(self, stem: str, suffix: str) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{stem}{suffix}"
        i = 1
        while path.exists():
            path = self.workdir / f"{stem}-{i}{suffix}"
            i += 1
        return path


def setting(default: Any, description: str) -> Any:
    """A config field with its one-line description, shown by `slimctl passes NAME` (a test fails on a field without one)."""
    return field(default=default, metadata={"description": description})


def description_of(f: dataclasses.Field) -> str:
    return f.metadata.get("description", "")


# Settings renamed since a recipe may have been written: the old name -> the new one.
RENAMED_SETTINGS = {"nodes_to_exclude": "exclude", "ignored_layers": "exclude"}


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: frozen, typed, and versioned so that saved recipes keep loading."""

    version: int = setting(1, "the config's format version; a recipe written for another version is refused")


ConfigT = TypeVar("ConfigT", bound=PassConfig)


class Pass(abc.ABC, Generic[ConfigT]):
    """A pass over configs of type ConfigT; its docstring's first line is what `slimctl passes` shows of it."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]] = PassConfig
    # The family shown by `slimctl passes`: graph | prune | distill | quantize | search.
    kind: ClassVar[str] = ""
    # A pass that trains in torch: it needs the model as .pt2 and train data, and its config holds its
    # epochs (a `finetune` FineTuneConfig, or an `epochs` field of its own); the auto search reads both.
    trains: ClassVar[bool] = False
    # A training pass that also trains without labels, toward its teacher's / the unpruned model's outputs (optimizer.objectives).
    label_free: ClassVar[bool] = False
    # Dataset roles the pass reads besides train data (e.g. calibration), so a search can skip what cannot run.
    needs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every pass's `run` is guarded: whatever fails inside it becomes a refusal that names the pass (guarded_run)."""
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is not None and not getattr(run, "_guarded", False):
            cls.run = guarded_run(run)  # type: ignore[method-assign]

    def __init__(self, config: ConfigT | None = None) -> None:
        given: PassConfig = config if config is not None else self.config_cls()
        if not isinstance(given, self.config_cls):
            raise OptimizerError(f"pass '{self.name}' takes a {self.config_cls.__name__}, not {type(given).__name__}")
        self.config: ConfigT = cast(ConfigT, given)

    @abc.abstractmethod
    def run(self, artifact: Artifact, context: PassContext) -> Artifact:
        """Returns a new artifact written under context.workdir."""


def guarded_run(run: Callable[[Any, Artifact, PassContext], Artifact]) -> Callable[[Any, Artifact, PassContext], Artifact]:
    """`run` with any exception that is not already a refusal turned into an OptimizerError naming the pass and the failure.

    A pass refuses what it knows it cannot do (OptimizerError, with its own advice); anything else that escapes
    (onnx, onnxruntime, torch raising on a graph the pass did not foresee) is reported with the pass's name, the
    operator or layer the error names, and what to try, so that a job never ends as INTERNAL.
    """
    import functools

    @functools.wraps(run)
    def guarded(self: Pass, artifact: Artifact, context: PassContext) -> Artifact:
        try:
            result = run(self, artifact, context)
        except (OptimizerError, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:
            raise OptimizerError(pass_failure(self.name, artifact, e)) from e
        if result.format == "onnx" and result.path != artifact.path:
            check_written_onnx(self.name, result.path)
        return result

    guarded._guarded = True  # type: ignore[attr-defined]
    return guarded


def checker_problem(path: Path, empty: str = "invalid") -> str | None:
    """The first line of what onnx's checker rejects in the file at `path` (`empty` when it says nothing), or None."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else empty
    return None


def check_written_onnx(name: str, path: Path) -> None:
    """Refuses an ONNX file a pass wrote that onnx's checker rejects (e.g. an attribute its opset lacks), before anything loads it."""
    first = checker_problem(path)
    if first is not None:
        raise OptimizerError(
            f"{name} wrote a graph that onnx's checker rejects ({first}); nothing was registered. "
            "Try the pass with other settings (e.g. per_channel false) or another recipe, and report it as a slimserve bug"
        )


def pass_failure(name: str, artifact: Artifact, error: BaseException) -> str:
    """The refusal for an unforeseen failure inside pass `name`: what failed, where (operator / layer), what to do."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 400:
        text = text[:400] + " ..."
    return (
        f"{name} failed on {artifact.path.name}: {type(error).__name__}: {text}; nothing was registered. "
        f"The model as it is still serves: try another recipe, or exclude the operator or layer named above "
        f"(exclude / op_types in a recipe file), and report it if it looks like a slimserve bug"
    )


def config_to_dict(config: PassConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type[ConfigT], data: dict[str, Any], where: str) -> ConfigT:
    """Builds a config from a recipe's dict, naming any unknown or mistyped field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    renamed = [u for u in unknown if RENAMED_SETTINGS.get(u) in fields]
    if renamed:
        old = renamed[0]
        raise OptimizerError(f"{where}: '{old}' is now '{RENAMED_SETTINGS[old]}'; rename the setting in the recipe")
    if unknown:
        raise OptimizerError(f"{where}: unknown setting {', '.join(repr(u) for u in unknown)} (settings: {', '.join(fields)})")
    version = data.get("version", 1)
    if version != cls().version:
        raise OptimizerError(f"{where}: config version {version} is not supported (this slimserve reads version {cls().version})")
    values = {}
    for key, value in data.items():
        default = getattr(cls(), key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise OptimizerError(f"{where}: '{key}' must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise OptimizerError(f"{where}: '{key}' must be a number, got {value!r}")
            value = type(default)(value) if isinstance(default, float) else value
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise OptimizerError(f"{where}: {e}") from e


@dataclass(frozen=True)
class Knob:
    """The setting a budget search moves: a config field and its gentle and aggressive ends (either may be the larger)."""

    field: str
    gentle: float
    aggressive: float
    unless: str = ""  # a config field that, when set, fixes the model so that there is nothing to search (distill's `student`)

    def applies(self, config: PassConfig) -> bool:
        return not (self.unless and getattr(config, self.unless, None))
