"""The pass catalog: every pass by name (`PASSES`, name -> `module:Class`), `make_pass` from a recipe's dict, and what a pass is.

Like the server's RUNTIMES table: a pass module is imported only when its pass is first used, so no module of the
optimizer imports them all, the pass modules never import this one, and the package has no import cycle.
`describe` turns a pass class into plain records (its kind, the data it needs, its settings with their defaults and
descriptions) for `slimctl passes` and `slimserve passes`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from typing import Any

from slimserve.optimizer.base import OptimizerError, Pass, PassConfig, config_from_dict, description_of

# A new pass: its class in a module under optimizer/passes/ and one line here.
PASSES: dict[str, str] = {
    "auto": "slimserve.optimizer.passes.auto:AutoPass",
    "distill-feature": "slimserve.optimizer.passes.distill:DistillFeaturePass",
    "distill-soft": "slimserve.optimizer.passes.distill:DistillSoftPass",
    "graph-compile": "slimserve.optimizer.passes.graph:CompilePass",
    "graph-dynamic-seq": "slimserve.optimizer.passes.dynamic_seq:DynamicSeqPass",
    "graph-ort": "slimserve.optimizer.passes.graph:OrtGraphPass",
    "graph-xla": "slimserve.optimizer.passes.graph:XlaPass",
    "prune-gradual": "slimserve.optimizer.passes.prune:PruneGradualPass",
    "prune-structured": "slimserve.optimizer.passes.prune_structured:PruneStructuredPass",
    "prune-weight": "slimserve.optimizer.passes.prune:PruneWeightPass",
    "quantize-dynamic": "slimserve.optimizer.passes.quantize_dynamic:QuantizeDynamicPass",
    "quantize-qat": "slimserve.optimizer.passes.quantize_qat:QuantizeQatPass",
    "quantize-static": "slimserve.optimizer.passes.quantize_static:QuantizeStaticPass",
}

# What each dataset role is, as `slimctl passes` says it (the `slimctl register` flag that provides it).
DATA_ROLES = {
    "data": "evaluation data (--data)",
    "train": "train data (--train)",
    "calibration": "calibration data (--calibration)",
}


def pass_class(name: str) -> type[Pass] | None:
    """The class of the pass `name` (its module imported on first use), or None for a name not in PASSES."""
    target = PASSES.get(name)
    if target is None:
        return None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def pass_classes() -> dict[str, type[Pass]]:
    """Every pass class by name, in the table's order (imports every pass module)."""
    return {name: cls for name in PASSES if (cls := pass_class(name)) is not None}


def make_pass(name: str, config: dict[str, Any] | None = None, where: str = "") -> Pass:
    """The pass `name` with its config built from a recipe's dict; unknown names and settings are OptimizerErrors."""
    cls = pass_class(name)
    if cls is None:
        raise OptimizerError(f"{where or 'recipe'}: unknown recipe or pass '{name}' (known: {', '.join(sorted(PASSES))})")
    return cls(config_from_dict(cls.config_cls, config or {}, f"{where or 'pass'} '{name}'"))


# ---------------------------------------------------------------------------------------------
# What a pass is, in plain records


@dataclass(frozen=True)
class SettingInfo:
    """One setting of a pass: its recipe key (`finetune.epochs` for a nested one), type, default (as JSON) and description."""

    name: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class PassInfo:
    name: str
    kind: str  # graph | prune | distill | quantize | search
    description: str  # the first line of the pass class's docstring
    needs: tuple[str, ...]  # what the model must have been registered with, in words
    settings: tuple[SettingInfo, ...]


def needs_of(cls: type[Pass]) -> tuple[str, ...]:
    """What the pass needs besides the model, in the words `slimctl passes` shows."""
    needs = []
    if cls.trains:
        needs.append("train data (--train), labels optional" if cls.label_free else "train data (--train) with labels")
    needs += [DATA_ROLES.get(role, f"{role} data (--{role})") for role in cls.needs]
    return tuple(needs)


def _type_name(f: dataclasses.Field) -> str:
    written = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {"tuple[str, ...]": "list[str]"}.get(written, written)


def _json(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def settings_of(config: PassConfig, prefix: str = "") -> tuple[SettingInfo, ...]:
    """The settings of a config, nested configs flattened as `finetune.epochs` (a nested config's own `version` left out)."""
    rows: list[SettingInfo] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if prefix and f.name == "version":
            continue
        if isinstance(value, PassConfig):
            rows += settings_of(value, f"{prefix}{f.name}.")
        else:
            rows.append(SettingInfo(prefix + f.name, _type_name(f), _json(value), description_of(f)))
    return tuple(rows)


def describe(name: str) -> PassInfo:
    """The pass `name` as plain records; an unknown name is an OptimizerError that lists the known ones."""
    cls = pass_class(name)
    if cls is None:
        raise OptimizerError(f"unknown pass '{name}' (known: {', '.join(sorted(PASSES))}); `slimctl passes` lists them")
    doc = (cls.__doc__ or "").strip().splitlines()
    return PassInfo(name, cls.kind, doc[0] if doc else "", needs_of(cls), settings_of(cls.config_cls()))


def describe_all() -> list[PassInfo]:
    return [describe(name) for name in PASSES]
