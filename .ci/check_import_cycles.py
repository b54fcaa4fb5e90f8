"""Fails when modules of the project import each other in a cycle, and prints each cycle import by import.

import-linter's `acyclic_siblings` contract (pyproject.toml) keeps the parts of each package in a DAG but
does not see a package's `__init__` and one of its own modules importing each other, and names the imports
to cut rather than the cycle. This check works on single modules, so it sees both. Imports inside functions
and under `if TYPE_CHECKING:` count: grimp reads every import statement, as import-linter does.
Run from the repository root with the checkout first on the path: `PYTHONPATH=. python .ci/check_import_cycles.py`.
"""

from __future__ import annotations

import itertools
import sys
import tomllib
from collections import deque
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            module, edges = work[-1]
            for imported in edges:
                if imported not in index:
                    index[imported] = low[imported] = len(index)
                    stack.append(imported)
                    on_stack.add(imported)
                    work.append((imported, iter(sorted(graph.find_modules_directly_imported_by(imported)))))
                    break
                if imported in on_stack:
                    low[module] = min(low[module], index[imported])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def shortest_cycle(graph: grimp.ImportGraph, component: list[str]) -> list[str]:
    """The shortest cycle through the component's first module, staying inside the component."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for imported in sorted(graph.find_modules_directly_imported_by(module) & members):
            if imported == start:
                path = [module]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if imported not in came_from:
                came_from[imported] = module
                queue.append(imported)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def source_file(module: str) -> str:
    path = Path(*module.split("."))
    return str(path / "__init__.py" if (ROOT / path).is_dir() else path.with_suffix(".py"))


def main() -> int:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]
    graph = grimp.build_graph(*packages, cache_dir=None)
    components = strongly_connected(graph)
    for component in components:
        cycle = shortest_cycle(graph, component)
        print(f"import cycle: {' -> '.join(cycle)}")
        for importer, imported in itertools.pairwise(cycle):
            for detail in graph.get_import_details(importer=importer, imported=imported)[:1]:
                print(f"  {source_file(importer)}:{detail['line_number']}: {detail['line_contents']}")
        if len(component) > len(cycle) - 1:
            print(f"  (and more cycles among these {len(component)} modules: {', '.join(component)})")
    if components:
        print(
            f"{len(components)} import cycle(s) between modules of {', '.join(packages)}: move the shared code down into a "
            "module both sides import, or pass a callable in (docs/architecture.md, 'Import rules')."
        )
        return 1
    print(f"no import cycles between the modules of {', '.join(packages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
