"""The layer order holds: the import-linter contracts of ``pyproject.toml`` (also run by ``lint-imports`` in
``.ci/run``) and, over every module of every package, no import circle at all."""

from pathlib import Path

import grimp
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("moe", "routing", "all_to_all", "expert_parallel", "quant", "hypermoe", "serve")


def test_import_linter_contracts_are_kept():
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def find_cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import circle among the graph's modules (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_circle_between_any_two_modules():
    graph = grimp.build_graph(*PACKAGES)
    assert len(graph.modules) > 80  # every package was found
    assert find_cycle(graph) is None


def test_find_cycle_reports_a_circle():
    graph = grimp.ImportGraph()
    for importer, imported in (("a.x", "a.y"), ("a.y", "b.z"), ("b.z", "a.x"), ("b.z", "b.w")):
        graph.add_import(importer=importer, imported=imported)
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a.x", "a.y", "b.z"}
