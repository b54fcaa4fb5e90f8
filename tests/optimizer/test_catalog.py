"""Tests for optimizer/catalog.py: every built-in pass by name, configs from dicts, their settings described, and what the search reads of a pass."""

from __future__ import annotations

import dataclasses

import pytest

from slimserve.optimizer.base import OptimizerError, PassConfig, check_fraction
from slimserve.optimizer.catalog import PASSES, describe, describe_all, make_pass, pass_class, pass_classes
from slimserve.optimizer.search.budget import BudgetOptions

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


def test_every_table_entry_imports_and_its_class_has_that_name():
    assert set(PASSES) == BUILTIN
    for name, target in PASSES.items():
        cls = pass_class(name)
        assert cls is not None and f"{cls.__module__}:{cls.__qualname__}" == target
        assert cls.name == name, f"{target} is named {cls.name!r}, its row {name!r}"
        assert cls.kind in {"graph", "prune", "distill", "quantize", "search"}, name
        assert (cls.__doc__ or "").strip(), f"{target} has no docstring: `slimctl passes` shows its first line"
    assert pass_class("quantize") is None


def test_every_builtin_pass_builds_with_its_defaults():
    for name in BUILTIN:
        p = make_pass(name)
        assert p.name == name and isinstance(p.config, p.config_cls)


def _configs(config: PassConfig, where: str):
    yield where, config
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, PassConfig):
            yield from _configs(value, f"{where}.{f.name}")


def test_every_config_field_has_a_one_line_description():
    configs = [c for name, cls in pass_classes().items() for c in _configs(cls.config_cls(), name)]
    configs += list(_configs(BudgetOptions(), "budget"))
    missing = []
    for where, config in configs:
        for f in dataclasses.fields(config):
            description = f.metadata.get("description", "")
            if not description or "\n" in description:
                missing.append(f"{where}.{f.name}")
    assert not missing, f"fields without a one-line description (setting(default, '...')): {missing}"


def test_describe_lists_the_settings_flattened_with_their_defaults_and_what_the_pass_needs():
    info = describe("prune-structured")
    assert info.kind == "prune" and info.description.startswith("Channel pruning")
    assert info.needs == ("train data (--train), labels optional",)
    settings = {s.name: s for s in info.settings}
    assert settings["pruning_ratio"].type == "float" and settings["pruning_ratio"].default == "0.25"
    assert settings["exclude"].type == "list[str]" and settings["exclude"].default == "[]"
    assert settings["finetune.epochs"].default == "3"  # the pass's own default, not the loop's
    assert "finetune.augment.kind" in settings and "finetune.version" not in settings
    assert describe("quantize-static").needs == ("calibration data (--calibration)",)
    assert describe("auto").needs == ("evaluation data (--data)",)
    assert describe("prune-weight").needs == ("train data (--train) with labels",)
    assert describe("graph-ort").needs == ()
    assert [i.name for i in describe_all()] == list(PASSES)
    with pytest.raises(OptimizerError, match=r"unknown pass 'shrink' \(known: auto, distill-feature"):
        describe("shrink")


def test_an_unknown_pass_or_setting_names_what_is_known():
    with pytest.raises(OptimizerError, match=r"recipe: unknown recipe or pass 'quantize' \(known: auto, distill-feature"):
        make_pass("quantize")
    with pytest.raises(OptimizerError, match=r"unknown setting 'levels' \(settings: version, level, providers\)"):
        make_pass("graph-ort", {"levels": "basic"})


@pytest.mark.parametrize(("name", "old"), [("quantize-static", "nodes_to_exclude"), ("prune-structured", "ignored_layers")])
def test_a_setting_under_its_old_name_says_its_new_one(name, old):
    with pytest.raises(OptimizerError, match=rf"'{old}' is now 'exclude'"):
        make_pass(name, {old: ["conv1"]})
    assert make_pass(name, {"exclude": ["conv1"]}).config.exclude == ("conv1",)


def test_every_pass_that_selects_layers_calls_the_setting_exclude():
    for name, cls in pass_classes().items():
        fields = {f.name for f in dataclasses.fields(cls.config_cls)}
        assert not fields & {"nodes_to_exclude", "ignored_layers", "ignored", "skip"}, name


def test_check_fraction():
    check_fraction("sparsity", 0.5)
    for bad in (0.0, 1.0, "0.5"):
        with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
            check_fraction("sparsity", bad)


def test_training_passes_say_so_and_hold_their_epochs():
    classes = pass_classes()
    trains = {name for name, cls in classes.items() if cls.trains}
    assert trains == {"prune-weight", "prune-structured", "prune-gradual", "distill-soft", "distill-feature", "quantize-qat"}
    for name in trains:  # what the auto search sets: finetune.epochs, or the pass's own epochs
        fields = {f.name for f in dataclasses.fields(classes[name].config_cls)}
        assert "finetune" in fields or "epochs" in fields
    assert classes["quantize-static"].needs == ("calibration",)
