"""Tests for optimizer/catalog.py: every built-in pass by name, configs from dicts, and what the search reads of a pass."""

from __future__ import annotations

import dataclasses

import pytest

from slimserve.optimizer.base import Artifact, OptimizerError, Pass, PassContext
from slimserve.optimizer.catalog import BUILTIN_PASS_MODULES, PASSES, load_builtin_passes, make_pass, register

BUILTIN = {
    "auto",
    "distill-feature",
    "distill-soft",
    "graph-compile",
    "graph-dynamic-seq",
    "graph-ort",
    "graph-xla",
    "prune-gradual",
    "prune-structured",
    "prune-weight",
    "quantize-dynamic",
    "quantize-qat",
    "quantize-static",
}


def test_every_builtin_pass_is_known_by_name_and_builds_with_its_defaults():
    assert set(load_builtin_passes()) == BUILTIN
    assert len(BUILTIN_PASS_MODULES) == len({cls.__module__ for cls in PASSES.values()})
    for name in BUILTIN:
        p = make_pass(name)
        assert p.name == name and isinstance(p.config, p.config_cls)


def test_an_unknown_pass_or_setting_names_what_is_known():
    with pytest.raises(OptimizerError, match=r"recipe: unknown recipe or pass 'quantize' \(known: auto, distill-feature"):
        make_pass("quantize")
    with pytest.raises(OptimizerError, match=r"unknown setting 'levels' \(settings: version, level, providers\)"):
        make_pass("graph-ort", {"levels": "basic"})


def test_training_passes_say_so_and_hold_their_epochs():
    trains = {name for name, cls in load_builtin_passes().items() if cls.trains}
    assert trains == {"prune-weight", "prune-structured", "prune-gradual", "distill-soft", "distill-feature", "quantize-qat"}
    for name in trains:  # what the auto search sets: finetune.epochs, or the pass's own epochs
        fields = {f.name for f in dataclasses.fields(PASSES[name].config_cls)}
        assert "finetune" in fields or "epochs" in fields
    assert PASSES["quantize-static"].needs == ("calibration",)


def test_a_name_registered_twice_is_refused():
    class Twin(Pass):
        name = "graph-ort"

        def run(self, artifact: Artifact, context: PassContext) -> Artifact:
            return artifact

    load_builtin_passes()
    with pytest.raises(ValueError, match="pass 'graph-ort' is registered twice"):
        register(Twin)
    assert register(PASSES["graph-ort"]) is PASSES["graph-ort"]  # importing a module again is harmless
