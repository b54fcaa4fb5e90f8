"""A Triton-layout model repository served as it is (`slimserve start --model-repository DIR`).

    DIR/<model>/config.pbtxt             Triton's ModelConfig in text format (optional for an ONNX model, as in Triton)
    DIR/<model>/<label file>             what an output's label_filename names
    DIR/<model>/<version>/model.onnx     numbered version directories (model.pt2 for torch.export programs)

Each model comes into slimserve's own repository: version N of the directory is the variant of version N (the lowest
at the first import is `baseline`, the others `v<N>`), unversioned requests go to the latest (Triton's rule), and the
config's serving settings and label files are stored beside the model (`Repository.set_serving`), applied at every load
and restart. A model already imported from the same files is not imported again. One whose files changed (poll mode, or
a restart) has only its changed versions replaced, its new ones added and its removed ones dropped, all checked before
anything changes, so its optimized variants and their traffic stay; a change that cannot be served leaves the previous
import serving, with the reason logged and in the repository index. A version keeps its variant's name while it stays:
when the baseline's version leaves, the lowest one left becomes the baseline (`_update_import`); only the optimized
variants of a version that left go, with it.

Every model stands alone: one that cannot be served (a config that does not parse, dims that disagree with the model
file, a missing label file, a version directory without a model file, a TorchScript model.pt, a backend slimserve has
not) is reported with its reason and left out; the others serve. Fields of a config that slimserve reads but does not
apply are listed with the reason (`TritonModel.not_applied`), never dropped silently.

The config text is parsed by the transport room (server/grpc/triton_converters.parse_config_pbtxt, passed in as
`parse_config`): this room speaks no protobuf.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimserve.server.errors import InvalidArgument, SlimServeError
from slimserve.server.inference.model_config import parse_load_config
from slimserve.server.runtimes import RuntimeConfig, create_runtime
from slimserve.server.store.manifest import BASELINE, RUNTIME_OF_FORMAT, ModelInfo, VariantInfo, validate_name
from slimserve.server.store.repository import Repository
from slimserve.server.store.traffic import TrafficPolicy
from slimserve.server.store.upload import Registrar, UploadFile, UploadHeader

log = logging.getLogger(__name__)

ParseConfig = Callable[[str, str], dict[str, Any]]
CONTROL_MODES = ("none", "explicit", "poll")
MODEL_FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}
# platform / backend -> the format slimserve serves it as
PLATFORMS = {"onnxruntime_onnx": "onnx", "onnxruntime": "onnx", "pytorch": "pt2", "torch": "pt2"}
_REFUSED_SCHEDULING = {
    "sequence_batching": "sequence batching (stateful models) is not served by slimserve",
    "ensemble_scheduling": "ensembles are not served by slimserve; serve each model and chain them in the client",
}
_NOT_APPLIED = {
    "optimization": "slimserve picks ONNX Runtime's execution providers from --device and optimizes with `slimctl optimize`; "
    "TensorRT / OpenVINO accelerator settings, CUDA graphs and priorities are not applied",
    "model_warmup": "slimserve warms each variant itself when it loads",
    "response_cache": "slimserve has no response cache",
    "batch_input": "ragged batching is not served",
    "batch_output": "ragged batching is not served",
    "model_repository_agents": "repository agents are not run",
    "cc_model_filenames": "compute-capability model files are not used",
    "metric_tags": "metrics carry model and variant labels only",
    "model_operations": "custom operation libraries are not loaded",
    "model_metrics": "metric options are not applied (see --metrics-port)",
    "runtime": "slimserve picks the runtime from the model file",
}
_APPLIED_BATCHING = {"preferred_batch_size", "max_queue_delay_microseconds"}
_APPLIED_GROUP = {"name", "count", "kind"}
_APPLIED_INPUT = {"name", "data_type", "dims", "format"}
_APPLIED_OUTPUT = {"name", "data_type", "dims", "label_filename"}
TORCHSCRIPT = "model.pt"


@dataclass
class TritonModel:
    """One model directory, read: what it serves as, or why it cannot."""

    name: str
    path: Path
    format: str = ""
    versions: dict[int, Path] = field(default_factory=dict)  # version -> its model file
    config: dict[str, Any] = field(default_factory=dict)  # the applied part, as a RepositoryModelLoad `config`
    label_files: dict[str, bytes] = field(default_factory=dict)  # "file:<label_filename>" -> content
    not_applied: list[str] = field(default_factory=list)  # "field: reason"
    fingerprint: str = ""  # of every file of the directory: a change means a new import
    error: str = ""  # why it is not served ("" when it is)


def fingerprint(path: Path) -> str:
    """Names, sizes and modification times of every file under `path`: changes whenever a file does."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = f.stat()
        digest.update(f"{f.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def version_fingerprints(model: TritonModel) -> dict[str, str]:
    """Each version directory's own fingerprint, by version number (as a string: it is stored as JSON)."""
    return {str(n): fingerprint(f.parent) for n, f in sorted(model.versions.items())}


class VersionRefused(InvalidArgument):
    """A version of a model directory that cannot be served; `version` names it for the repository index."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


def scan(root: Path, parse_config: ParseConfig, device: str = "cpu") -> list[TritonModel]:
    """Every model directory of a Triton repository, read (none is imported yet); sorted by name."""
    if not root.is_dir():
        raise InvalidArgument(f"--model-repository {root}: not a directory")
    models = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        model = TritonModel(path.name, path)
        try:
            validate_name(path.name)
            _read(model, parse_config, device)
            model.fingerprint = fingerprint(path)
        except SlimServeError as e:
            model.error = e.message
        except OSError as e:
            model.error = f"{path}: cannot be read: {e}"
        models.append(model)
    return models


def _read(model: TritonModel, parse_config: ParseConfig, device: str) -> None:
    path = model.path
    config_path = path / "config.pbtxt"
    config = parse_config(config_path.read_text(), str(config_path)) if config_path.exists() else {}
    where = str(config_path)
    if config.get("name", model.name) != model.name:
        raise InvalidArgument(f"{where}: name '{config['name']}' is not the directory's name '{model.name}' (Triton requires them equal)")
    for key, reason in _REFUSED_SCHEDULING.items():
        if key in config:
            raise InvalidArgument(f"{where}: {key}: {reason}")
    if config.get("model_transaction_policy", {}).get("decoupled"):
        raise InvalidArgument(f"{where}: model_transaction_policy.decoupled: decoupled models are not served by slimserve")
    platform, backend = config.get("platform", ""), config.get("backend", "")
    if platform == "pytorch_libtorch" or (backend == "pytorch" and _has_torchscript(path)):
        raise InvalidArgument(
            f"{where}: TorchScript (platform pytorch_libtorch, model.pt) is not served: export the model with torch.export "
            "(torch.export.save(program, 'model.pt2')) and put model.pt2 in the version directory"
        )
    for value in (platform, backend):
        if value and value not in PLATFORMS:
            raise InvalidArgument(
                f"{where}: {'platform' if value == platform else 'backend'} '{value}' is not served by slimserve "
                f"(served: {', '.join(sorted(PLATFORMS))}: ONNX models as model.onnx, torch.export programs as model.pt2)"
            )
    declared = PLATFORMS.get(platform or backend, "")
    model.versions, model.format = _versions(model, config, declared)
    model.config, model.not_applied = _applied(config, device)
    for output in model.config.get("output", []):
        label = output.get("label_filename")
        if label:
            file = path / label
            if not file.is_file():
                raise InvalidArgument(f"{where}: output '{output.get('name')}' label_filename '{label}': {file} does not exist")
            model.label_files[f"file:{label}"] = file.read_bytes()


def _has_torchscript(path: Path) -> bool:
    return any((v / TORCHSCRIPT).exists() for v in path.iterdir() if v.is_dir() and v.name.isdigit())


def _versions(model: TritonModel, config: dict[str, Any], declared: str) -> tuple[dict[int, Path], str]:
    """The version directories the version policy serves (Triton's default: the latest one), each with its model file."""
    path = model.path
    numbered = sorted(int(v.name) for v in path.iterdir() if v.is_dir() and v.name.isdigit())
    if not numbered:
        raise InvalidArgument(f"{path}: no version directory (a numbered directory such as {path / '1'} holding model.onnx or model.pt2)")
    policy = config.get("version_policy", {"latest": {}})
    if "all" in policy:
        chosen = numbered
    elif "specific" in policy:
        wanted = [int(v) for v in policy["specific"].get("versions", [])]
        missing = [v for v in wanted if v not in numbered]
        if missing:
            raise InvalidArgument(f"{path}/config.pbtxt: version_policy.specific names version(s) {missing} that have no directory")
        chosen = sorted(wanted)
    else:
        chosen = numbered[-int(policy.get("latest", {}).get("num_versions", 1) or 1) :]
    default_file = config.get("default_model_filename", "")
    versions, formats = {}, set()
    for number in chosen:
        directory = path / str(number)
        if (directory / TORCHSCRIPT).exists() and not any((directory / f).exists() for f in MODEL_FILES.values()):
            raise InvalidArgument(
                f"{directory / TORCHSCRIPT}: TorchScript is not served: export the model with torch.export "
                "(torch.export.save(program, 'model.pt2')) and put model.pt2 in the version directory"
            )
        names = [default_file] if default_file else [MODEL_FILES[declared]] if declared else list(MODEL_FILES.values())
        found = next((directory / n for n in names if (directory / n).is_file()), None)
        if found is None:
            raise InvalidArgument(f"{directory}: version {number} has no model file (expected {' or '.join(names)})")
        fmt = "pt2" if found.suffix == ".pt2" else "onnx" if found.suffix == ".onnx" else ""
        if not fmt:
            raise InvalidArgument(f"{found}: default_model_filename must end in .onnx or .pt2")
        versions[number] = found
        formats.add(fmt)
    if len(formats) > 1:
        raise InvalidArgument(f"{path}: versions mix .onnx and .pt2 files; one model has one format")
    return versions, formats.pop()


def _applied(config: dict[str, Any], device: str) -> tuple[dict[str, Any], list[str]]:
    """The part of a config slimserve applies (as a load `config`), and each field it leaves with the reason."""
    applied: dict[str, Any] = {}
    skipped: list[str] = []
    for key, value in config.items():
        if key in ("name", "platform", "backend", "version_policy", "default_model_filename"):
            continue  # taken by the import itself
        if key == "max_batch_size":
            applied[key] = value
        elif key == "dynamic_batching":
            applied[key] = {k: v for k, v in value.items() if k in _APPLIED_BATCHING}
            skipped += [
                f"dynamic_batching.{k}: not applied (slimserve's batcher applies preferred_batch_size and max_queue_delay_microseconds)"
                for k in value
                if k not in _APPLIED_BATCHING
            ]
        elif key == "instance_group":
            groups = []
            for group in value:
                kept = {k: v for k, v in group.items() if k in _APPLIED_GROUP}
                served = "KIND_GPU" if "cuda" in device else "KIND_CPU"
                if kept.get("kind", "KIND_AUTO") not in ("KIND_AUTO", served):
                    skipped.append(f"instance_group.kind {kept.pop('kind')}: not applied (this server runs models as {served})")
                skipped += [f"instance_group.{k}: not applied (slimserve applies count and kind)" for k in group if k not in _APPLIED_GROUP]
                groups.append(kept)
            applied[key] = groups
        elif key in ("input", "output"):
            allowed = _APPLIED_INPUT if key == "input" else _APPLIED_OUTPUT
            applied[key] = [{k: v for k, v in entry.items() if k in allowed} for entry in value]
            skipped += [f"{key} '{e.get('name')}'.{k}: not applied" for e in value for k in e if k not in allowed]
        elif key == "parameters":
            kept = {k: v for k, v in value.items() if k == "intra_op_thread_count"}
            if kept:
                applied[key] = kept
            skipped += [f"parameters.{k}: not applied (slimserve applies intra_op_thread_count)" for k in value if k not in kept]
        elif key == "model_transaction_policy":
            continue  # not decoupled (refused above): the default
        else:
            skipped.append(f"{key}: {_NOT_APPLIED.get(key, 'not applied by slimserve')}")
    return applied, skipped


# ------------------------------------------------------------------ import


def stored_source(repository: Repository, name: str) -> dict[str, Any] | None:
    serving = repository.serving(name)
    return serving.get("source") if serving else None


def import_model(
    repository: Repository, registrar: Registrar, runtime_config: RuntimeConfig, model: TritonModel, batching: Any
) -> ModelInfo:
    """Brings one read model into slimserve's repository (blocking: run on the compute pool); replaces an earlier import
    of it. Checked against its model files before it counts as imported: nothing half registered stays."""
    existing = model.name in repository.names()
    if existing:
        source = stored_source(repository, model.name)
        if source is None or source.get("path") != str(model.path):
            raise InvalidArgument(
                f"{model.path}: a model '{model.name}' is already registered that was not imported from this directory; "
                "delete it (slimctl delete) or rename the directory"
            )
    numbers = sorted(model.versions)
    first = model.versions[numbers[0]]
    if existing:
        source = stored_source(repository, model.name) or {}
        old = source.get("versions")
        if old:  # changed versions only: optimized variants and traffic kept (those of a version that left go with it)
            return _update_import(repository, runtime_config, model, batching, old, source.get("variants"))
    if existing:  # the config checked against the new files before the old import goes (a broken change keeps the old)
        runtime = create_runtime(RUNTIME_OF_FORMAT[model.format], first, runtime_config)
        try:
            runtime.load()
            inputs, outputs = runtime.inputs, runtime.outputs
        except Exception as e:
            raise InvalidArgument(f"{first} could not be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        finally:
            runtime.unload()
        try:
            parse_load_config(json.dumps(model.config), model.name, inputs, runtime_config.device, batching, outputs, model.label_files)
        except SlimServeError as e:
            raise InvalidArgument(f"{model.path}: {e.message}") from e
        repository.delete(model.name)
    with repository.staging() as staged:
        copy = staged / f"upload-0{first.suffix}"
        shutil.copyfile(first, copy)
        header = UploadHeader(
            model.name, (UploadFile("model", first.name, copy.stat().st_size, ""),), f"imported from the Triton repository {model.path}"
        )
        info = registrar.commit(header, [copy], staged)
    try:
        for number in numbers[1:]:
            _add_version(repository, runtime_config, info, model.name, number, model.versions[number])
        config_text = json.dumps(model.config)
        parse_load_config(config_text, model.name, info.inputs, runtime_config.device, batching, info.outputs, model.label_files)
        latest = BASELINE if len(numbers) == 1 else f"v{numbers[-1]}"

        def number_versions(i: ModelInfo) -> None:
            for n in numbers:
                i.variants[BASELINE if n == numbers[0] else f"v{n}"].version = n
            i.last_version = max(numbers[-1], i.last_version)
            i.traffic = TrafficPolicy.single(latest)

        info = repository.update(model.name, number_versions)
        files = {k: base64.b64encode(v).decode() for k, v in model.label_files.items()}
        repository.set_serving(
            model.name,
            {
                "config": config_text,
                "files": files,
                "source": {
                    "path": str(model.path),
                    "fingerprint": model.fingerprint,
                    "versions": version_fingerprints(model),
                    "variants": {str(n): BASELINE if n == numbers[0] else f"v{n}" for n in numbers},
                },
            },
        )
    except SlimServeError as e:
        repository.delete(model.name)
        raise InvalidArgument(f"{model.path}: {e.message}") from e
    except Exception as e:
        repository.delete(model.name)
        raise InvalidArgument(f"{model.path}: {e}") from e
    return info


def _check_version(runtime_config: RuntimeConfig, info: ModelInfo, number: int, file: Path) -> None:
    """A version's file loads and has the model's inputs and outputs; VersionRefused says why not."""
    runtime = create_runtime(RUNTIME_OF_FORMAT[info.format], file, runtime_config)
    try:
        runtime.load()
        inputs, outputs = runtime.inputs, runtime.outputs
    except Exception as e:
        raise VersionRefused(
            f"version {number} ({file}) could not be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}", number
        ) from e
    finally:
        runtime.unload()
    if [(s.name, s.datatype) for s in inputs] != [(s.name, s.datatype) for s in info.inputs] or [s.name for s in outputs] != [
        s.name for s in info.outputs
    ]:
        raise VersionRefused(f"version {number} ({file}) has other inputs or outputs than the imported model", number)


def _version_variant(numbers: list[int], number: int) -> str:
    return BASELINE if number == numbers[0] else f"v{number}"


def _update_import(
    repository: Repository,
    runtime_config: RuntimeConfig,
    model: TritonModel,
    batching: Any,
    old: dict[str, str],
    old_names: dict[str, str] | None = None,
) -> ModelInfo:
    """A changed directory of an imported model: only the versions whose files changed are replaced, new ones added,
    removed ones dropped; optimized variants stay, and so does traffic unless it was the import's own (all to the
    latest version), which follows the new latest. Every new file and the config are checked first: a refusal
    (VersionRefused / InvalidArgument) changes nothing, the previous import keeps serving.

    A version keeps its variant name while it stays (`old_names`: number -> variant, stored with the import; imports
    stored before it was: the lowest `baseline`, the others `v<N>`), so a new version below the first is `v<N>` beside
    the baseline. When the baseline's own version leaves, the lowest version left becomes the baseline (its `v<N>`
    renamed, with its optimized variants, traffic and shadows following it; or, a new version, its file put in the
    baseline's place). The optimized variants of a version that left go with it (they are that version, optimized),
    logged by name; their traffic goes back to what remains, as a deleted variant's does."""
    info = repository.get(model.name)
    numbers = sorted(model.versions)
    old_numbers = sorted(map(int, old))
    names = {int(n): v for n, v in (old_names or {}).items()} or {n: _version_variant(old_numbers, n) for n in old_numbers}
    now = version_fingerprints(model)
    changed = [n for n in numbers if old.get(str(n)) != now[str(n)]]
    for n in changed:
        _check_version(runtime_config, info, n, model.versions[n])
    config_text = json.dumps(model.config)
    try:
        parse_load_config(config_text, model.name, info.inputs, runtime_config.device, batching, info.outputs, model.label_files)
    except SlimServeError as e:
        raise InvalidArgument(f"{model.path}: {e.message}") from e
    old_latest = names[old_numbers[-1]]
    was_import_traffic = info.traffic.weights == {old_latest: 1.0} and not info.traffic.shadows
    gone = [n for n in old_numbers if n not in model.versions]
    renamed: dict[str, str] = {}  # variant -> its new name (a version that becomes the baseline)
    new_names = {n: names[n] for n in numbers if n in names}
    if any(names[n] == BASELINE for n in gone):  # the baseline's version left: the lowest version left takes its place
        first = numbers[0]
        if first in new_names:
            renamed[new_names[first]] = BASELINE
        elif first not in changed:
            changed.append(first)
        new_names[first] = BASELINE
    for n in numbers:
        new_names.setdefault(n, f"v{n}")
    left = {names[n] for n in gone}
    dropped = _derived(info, left, set(names.values()))
    rollout = info.rollout or {}
    touched = left | dropped | set(renamed)
    if rollout.get("state") in ("shadow", "canary") and touched & {rollout.get("variant"), rollout.get("control")}:
        raise InvalidArgument(
            f"{model.path}: model '{model.name}' has a rollout running of '{rollout.get('variant')}' against "
            f"'{rollout.get('control')}', which this change would remove or rename (versions {', '.join(map(str, gone))} left); "
            "the previous import keeps serving: finish or abort the rollout (slimctl rollout abort), then the next poll imports it"
        )
    if dropped:
        log.warning(
            "model '%s': optimized variant(s) %s of version(s) %s that left %s are removed with them",
            model.name,
            ", ".join(sorted(dropped)),
            ", ".join(map(str, gone)),
            model.path,
        )
    info = _swap_versions(repository, info, left, dropped, renamed)
    for n in changed:
        variant = new_names[n]
        if variant in info.variants:  # replaced in place: the loaded copy serves until the reload that follows
            target = repository.variant_path(info, variant)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(model.versions[n], partial)
            partial.replace(target)
            size = target.stat().st_size

            def resize(i: ModelInfo, variant: str = variant, size: int = size) -> None:
                i.variants[variant].size_bytes = size

            info = repository.update(model.name, resize)
        else:
            _add_version(repository, runtime_config, info, model.name, n, model.versions[n])
        log.info("model '%s': version %d %s from %s", model.name, n, "replaced" if n in old_numbers else "added", model.path)
    latest = new_names[numbers[-1]]

    def number_versions(i: ModelInfo) -> None:
        for n in numbers:
            i.variants[new_names[n]].version = n
        i.last_version = max(numbers[-1], i.last_version)
        if was_import_traffic:
            i.traffic = TrafficPolicy.single(latest)

    info = repository.update(model.name, number_versions)
    files = {k: base64.b64encode(v).decode() for k, v in model.label_files.items()}
    source = {
        "path": str(model.path),
        "fingerprint": model.fingerprint,
        "versions": now,
        "variants": {str(n): v for n, v in new_names.items()},
    }
    repository.set_serving(model.name, {"config": config_text, "files": files, "source": source})
    return info


def _derived(info: ModelInfo, roots: set[str], versions: set[str]) -> set[str]:
    """The optimized variants made from `roots` (directly or from one another), not the imported versions themselves."""
    out: set[str] = set()
    grew = True
    while grew:
        grew = False
        for name, v in info.variants.items():
            if name not in versions and name not in out and (v.parent in roots or v.parent in out):
                out.add(name)
                grew = True
    return out


def _swap_versions(repository: Repository, info: ModelInfo, left: set[str], dropped: set[str], renamed: dict[str, str]) -> ModelInfo:
    """Removes the variants of versions that left and the optimized variants made from them; a version that becomes
    the baseline is renamed to it (its directory too), and what named it (parents, traffic, shadows) follows."""
    model = info.name
    repository.check_writable()  # before the first directory moves
    for name in sorted((left | dropped) - {BASELINE}):
        if name in info.variants:
            info = repository.remove_variant(model, name)
    if not renamed:  # the baseline stays, or a new version's file takes its place (as a changed version's does)
        return info
    for old_name in renamed:  # the baseline's directory goes, the new first version's takes its place
        grave = repository.variant_dir(model, BASELINE).with_name(f".{BASELINE}-left")
        shutil.rmtree(grave, ignore_errors=True)
        repository.variant_dir(model, BASELINE).rename(grave)
        repository.variant_dir(model, old_name).rename(repository.variant_dir(model, BASELINE))
        shutil.rmtree(grave, ignore_errors=True)

    def rename(i: ModelInfo) -> None:
        for old_name, new_name in renamed.items():
            record = i.variants.pop(old_name)
            record.name, record.parent, record.recipe = new_name, i.variants[BASELINE].parent, i.variants[BASELINE].recipe
            i.variants[new_name] = record
        for v in i.variants.values():
            v.parent = renamed.get(v.parent, v.parent)
        i.traffic = _renamed_traffic(i.traffic, renamed)

    return repository.update(model, rename)


def _renamed_traffic(policy: TrafficPolicy, renamed: dict[str, str]) -> TrafficPolicy:
    """`policy` once the old baseline is gone (its weight goes to the rest, as a deleted variant's does) and `renamed`
    variants carry their new names; its history too."""

    def one(p: TrafficPolicy) -> TrafficPolicy:
        weights: dict[str, float] = {}
        for name, weight in p.weights.items():
            if name == BASELINE:
                continue  # the old baseline's content left with its version
            weights[renamed.get(name, name)] = weights.get(renamed.get(name, name), 0.0) + weight
        total = sum(weights.values())
        weights = {k: w / total for k, w in weights.items()} if total > 0 else {BASELINE: 1.0}
        shadows = tuple(renamed.get(s, s) for s in p.shadows if s != BASELINE and renamed.get(s, s) not in weights)
        return TrafficPolicy(weights, shadows, p.sticky_parameter)

    current = one(policy)
    previous = one(policy.previous) if policy.previous is not None else None
    return TrafficPolicy(current.weights, current.shadows, current.sticky_parameter, previous)


def _add_version(repository: Repository, runtime_config: RuntimeConfig, info: ModelInfo, name: str, number: int, file: Path) -> None:
    fmt = info.format
    runtime_name = RUNTIME_OF_FORMAT[fmt]
    with repository.staging() as staged:
        target_dir = staged / "variant"
        target_dir.mkdir()
        target = target_dir / MODEL_FILES[fmt]
        shutil.copyfile(file, target)
        runtime = create_runtime(runtime_name, target, runtime_config)
        try:
            runtime.load()
            inputs, outputs = runtime.inputs, runtime.outputs
        except Exception as e:
            raise InvalidArgument(
                f"version {number} ({file}) could not be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from e
        finally:
            runtime.unload()
        if [(s.name, s.datatype) for s in inputs] != [(s.name, s.datatype) for s in info.inputs] or [s.name for s in outputs] != [
            s.name for s in info.outputs
        ]:
            raise InvalidArgument(f"version {number} ({file}) has other inputs or outputs than the first version")
        variant = VariantInfo(
            name=f"v{number}",
            recipe="",
            parent=BASELINE,
            runtime=runtime_name,
            format=fmt,
            file=target.name,
            size_bytes=target.stat().st_size,
        )
        repository.add_variant(name, target_dir, variant)


class TritonRepository:
    """Keeps slimserve's repository in step with a Triton repository: `sync` at start, then (poll mode) every few seconds,
    importing what is new or changed and loading it; a model whose directory is gone is unloaded (it stays on record)."""

    def __init__(
        self,
        root: Path,
        control_mode: str,
        repository: Repository,
        registrar: Registrar,
        dataplane: Any,
        runtime_config: RuntimeConfig,
        parse_config: ParseConfig,
        poll_s: float = 15.0,
    ) -> None:
        if control_mode not in CONTROL_MODES:
            raise InvalidArgument(f"--model-control-mode {control_mode!r}: one of {', '.join(CONTROL_MODES)}")
        self.root = Path(root)
        self.control_mode = control_mode
        self.repository = repository
        self.registrar = registrar
        self.dataplane = dataplane
        self.runtime_config = runtime_config
        self.parse_config = parse_config
        self.poll_s = poll_s
        self.errors: dict[str, str] = {}  # model -> why it is not served (the last scan's)
        self.not_applied: dict[str, list[str]] = {}  # model -> config fields not applied, with the reason
        self.failed_versions: dict[str, int] = {}  # model -> the version that could not be imported (the last scan's)
        self._task: Any = None

    def imported(self) -> list[str]:
        """Models on record that came from this directory."""
        names = []
        for name in self.repository.names():
            source = stored_source(self.repository, name)
            if source is not None and Path(source.get("path", "")).parent == self.root:
                names.append(name)
        return names

    async def sync(self, announce: bool = True) -> list[str]:
        """Reads the directory, imports each model that is new or changed; returns those imported now. `announce`
        (at start): every served model's fields not applied are logged, not only those of models imported now."""
        device = "cuda" if "cuda" in self.runtime_config.device else "cpu"
        models = await self.dataplane.run_blocking(scan, self.root, self.parse_config, device)
        changed = []
        self.errors = {}
        self.failed_versions = {}
        for model in models:
            if model.error:
                self.errors[model.name] = model.error
                log.error("model '%s' of %s is not served: %s", model.name, self.root, model.error)
                continue
            self.not_applied[model.name] = model.not_applied
            source = stored_source(self.repository, model.name) if model.name in self.repository.names() else None
            unchanged = source is not None and (source.get("path"), source.get("fingerprint")) == (str(model.path), model.fingerprint)
            if announce or not unchanged:
                for line in model.not_applied:
                    log.warning("model '%s' (%s/config.pbtxt): %s", model.name, model.path, line)
            if unchanged:
                continue  # imported before from these very files
            try:
                await self.dataplane.run_blocking(
                    import_model, self.repository, self.registrar, self.runtime_config, model, self.dataplane.loader.batching
                )
            except SlimServeError as e:
                self.errors[model.name] = e.message
                if isinstance(e, VersionRefused):
                    self.failed_versions[model.name] = e.version
                if self.dataplane.is_loaded(model.name):
                    log.error(
                        "model '%s' of %s: the change is not imported, the previous import keeps serving: %s",
                        model.name,
                        self.root,
                        e.message,
                    )
                else:
                    log.error("model '%s' of %s is not served: %s", model.name, self.root, e.message)
                continue
            log.info("model '%s' imported from %s: versions %s", model.name, model.path, ", ".join(map(str, sorted(model.versions))))
            changed.append(model.name)
        return changed

    def unserved(self) -> list[tuple[str, int, str]]:
        """(model, version or 0 for the whole model, why) of every model directory the last scan could not import: the
        repository index lists them UNAVAILABLE with the reason, beside a previous import that still serves."""
        return [(name, self.failed_versions.get(name, 0), why) for name, why in sorted(self.errors.items())]

    def skipped_at_start(self) -> set[str]:
        """explicit mode, as Triton's: nothing of the directory loads until a RepositoryModelLoad names it."""
        return set(self.imported()) if self.control_mode == "explicit" else set()

    def start_polling(self) -> None:
        if self.control_mode == "poll":
            import asyncio

            self._task = asyncio.get_running_loop().create_task(self._poll(), name="triton repository poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass

    async def _poll(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("polling %s failed; trying again in %.0f s", self.root, self.poll_s)

    async def poll_once(self) -> list[str]:
        """One poll: changed models imported and loaded again, models whose directory is gone unloaded."""
        present = {p.name for p in self.root.iterdir() if p.is_dir()}
        for name in self.imported():
            if name not in present and self.dataplane.is_loaded(name):
                log.info("model '%s': its directory left %s: unloaded", name, self.root)
                await self.dataplane.unload_model(name)
        changed = await self.sync(announce=False)
        for name in changed:
            await self.dataplane.load_model(name)
        return changed
