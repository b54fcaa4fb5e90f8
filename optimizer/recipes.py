"""Recipes: ordered passes, each with its budget settings. By preset name, a comma-joined pipeline of names, or a JSON / YAML file.

A recipe file's entry may hold `"max_drop": PT` (this pass's own accuracy budget, over the job's) and
`"budget": {...}` (slimserve.optimizer.search.budget.BudgetOptions: the search's ends, evaluations, time limits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimserve.optimizer.base import (
    Artifact,
    OptimizerError,
    Pass,
    PassContext,
    ProgressEvent,
    config_from_dict,
    config_to_dict,
)
from slimserve.optimizer.catalog import make_pass
from slimserve.optimizer.evaluation.timing import TimingOptions
from slimserve.optimizer.search.budget import BudgetOptions

RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[Pass, ...]
    budgets: tuple[BudgetOptions, ...] = ()  # one per pass; empty: the defaults for every pass
    timing: TimingOptions = field(default_factory=TimingOptions)  # how long latencies and the speed-up are timed (a recipe file's "timing")

    def budget(self, i: int) -> BudgetOptions:
        return self.budgets[i] if i < len(self.budgets) else BudgetOptions()

    def to_dict(self) -> dict[str, Any]:
        entries = []
        for i, p in enumerate(self.passes):
            entry: dict[str, Any] = {"pass": p.name, "config": config_to_dict(p.config)}
            if self.budget(i) != BudgetOptions():
                entry["budget"] = config_to_dict(self.budget(i))
            entries.append(entry)
        data: dict[str, Any] = {"version": RECIPE_VERSION, "name": self.name, "passes": entries}
        if self.timing != TimingOptions():
            data["timing"] = config_to_dict(self.timing)
        return data


def budget_from_entry(entry: dict[str, Any], where: str) -> BudgetOptions:
    """A recipe entry's budget settings: its `budget` mapping, and `max_drop` beside `pass` as a shorthand."""
    data = entry.get("budget") or {}
    if not isinstance(data, dict):
        raise OptimizerError(f"{where}: 'budget' must be a mapping of settings, got {data!r}")
    if "max_drop" in entry:
        if "max_drop" in data and data["max_drop"] != entry["max_drop"]:
            raise OptimizerError(f"{where}: max_drop is given twice, as {entry['max_drop']!r} and in budget as {data['max_drop']!r}")
        data = {**data, "max_drop": entry["max_drop"]}
    for key in ("max_drop", "gentle", "aggressive"):  # None by default, so config_from_dict cannot check their type
        if data.get(key) is not None and (isinstance(data[key], bool) or not isinstance(data[key], (int, float))):
            raise OptimizerError(f"{where}: budget '{key}' must be a number, got {data[key]!r}")
    return config_from_dict(BudgetOptions, data, f"{where} budget")


def recipe_from_dict(data: dict[str, Any], where: str) -> Recipe:
    if not isinstance(data, dict) or "passes" not in data:
        raise OptimizerError(f"{where}: a recipe file holds {{'version': 1, 'name': ..., 'passes': [{{'pass': NAME, 'config': {{...}}}}]}}")
    if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
        raise OptimizerError(f"{where}: recipe version {data.get('version')} is not supported (this slimserve reads {RECIPE_VERSION})")
    passes, budgets = [], []
    for i, entry in enumerate(data["passes"]):
        if not isinstance(entry, dict) or "pass" not in entry:
            raise OptimizerError(f"{where}: passes[{i}] needs a 'pass' name")
        passes.append(make_pass(entry["pass"], entry.get("config") or {}, f"{where} passes[{i}]"))
        budgets.append(budget_from_entry(entry, f"{where} passes[{i}]"))
    if not passes:
        raise OptimizerError(f"{where}: the recipe has no passes")
    timing = data.get("timing") or {}
    if not isinstance(timing, dict):
        raise OptimizerError(
            f"{where}: 'timing' must be a mapping of settings ({', '.join(config_to_dict(TimingOptions()))}), got {timing!r}"
        )
    options = config_from_dict(TimingOptions, timing, f"{where} timing")
    return Recipe(str(data.get("name") or Path(where).stem), tuple(passes), tuple(budgets), options)  # type: ignore[arg-type]


def load_recipe_file(path: Path) -> Recipe:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise OptimizerError(f"{path.name}: not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OptimizerError(f"{path.name}: not valid JSON: {e}") from e
    return recipe_from_dict(data, path.name)


def parse_recipe(spec: str) -> Recipe:
    """'quantize-static', 'graph-ort,quantize-dynamic', or a path to a recipe file."""
    spec = spec.strip()
    if not spec:
        raise OptimizerError("no recipe given; name one, e.g. --recipe quantize-dynamic")
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise OptimizerError(f"recipe file '{spec}' does not exist")
        return load_recipe_file(path)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return Recipe("+".join(names), tuple(make_pass(n) for n in names))


def run_recipe(recipe: Recipe, artifact: Artifact, context: PassContext) -> Artifact:
    """Runs the passes in order, reporting progress between them."""
    n = len(recipe.passes)
    for i, p in enumerate(recipe.passes):
        if context.cancelled():
            raise OptimizerError("the job was cancelled")
        context.progress(ProgressEvent(stage=p.name, fraction=i / n, message=f"pass {i + 1}/{n}: {p.name}"))
        artifact = p.run(artifact, context)
    context.progress(ProgressEvent(stage="passes", fraction=1.0, message="passes done"))
    return artifact
