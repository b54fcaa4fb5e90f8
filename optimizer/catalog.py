"""The pass registry: pass classes by name, the list of built-in pass modules, and `make_pass` from a recipe's dict.

A pass module registers its classes with `@register` when it is imported. The registry imports the
built-in modules by name, on first use, so that no module of the optimizer needs to import them all:
pass modules import this one, never the other way round, and the package has no import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

from slimserve.optimizer.base import OptimizerError, Pass, config_from_dict

# Every built-in pass module; a new pass is one more module here (and its test).
BUILTIN_PASS_MODULES = (
    "slimserve.optimizer.passes.auto",
    "slimserve.optimizer.passes.distill",
    "slimserve.optimizer.passes.dynamic_seq",
    "slimserve.optimizer.passes.graph",
    "slimserve.optimizer.passes.prune",
    "slimserve.optimizer.passes.prune_structured",
    "slimserve.optimizer.passes.quantize_dynamic",
    "slimserve.optimizer.passes.quantize_static",
    "slimserve.optimizer.passes.quantize_qat",
)

PASSES: dict[str, type[Pass]] = {}
_loaded = False


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: makes the pass known by its name (a name registered twice is a programming error)."""
    if PASSES.get(cls.name, cls) is not cls:
        raise ValueError(f"pass '{cls.name}' is registered twice")
    PASSES[cls.name] = cls
    return cls


def load_builtin_passes() -> dict[str, type[Pass]]:
    """Imports every built-in pass module once (importing registers its passes); returns the registry."""
    global _loaded
    if not _loaded:
        for module in BUILTIN_PASS_MODULES:
            importlib.import_module(module)
        _loaded = True
    return PASSES


def pass_class(name: str) -> type[Pass] | None:
    return load_builtin_passes().get(name)


def make_pass(name: str, config: dict[str, Any] | None = None, where: str = "") -> Pass:
    """The pass `name` with its config built from a recipe's dict; unknown names and settings are OptimizerErrors."""
    cls = pass_class(name)
    if cls is None:
        raise OptimizerError(f"{where or 'recipe'}: unknown recipe or pass '{name}' (known: {', '.join(sorted(PASSES))})")
    return cls(config_from_dict(cls.config_cls, config or {}, f"{where or 'pass'} '{name}'"))
