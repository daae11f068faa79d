"""The package layout rule: a stage imports only from the stages before it, and no modules import each other.

Stages in the order data flows (docs/design.md): core, curation, tokens, model, eval, train, adapt, cli, recipes.
Every import counts, whether at module level, inside a function or under TYPE_CHECKING: a function-local import
is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
STAGES = ["core", "curation", "tokens", "model", "eval", "train", "adapt", "cli", "recipes"]
# The package root only carries the version; `python -m lmforge` is the command line.
ROOT_MODULES = {"lmforge": "core", "lmforge.__main__": "cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "lmforge").rglob("*.py"))}


def stage_of(module: str) -> str:
    if module in ROOT_MODULES:
        return ROOT_MODULES[module]
    stage = module.split(".")[1]
    if stage not in STAGES:
        raise AssertionError(f"module {module} is in no stage; stages are {', '.join(STAGES)}")
    return stage


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported lmforge module, line) for every import in the file, resolved to the most specific module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target != "lmforge" and not target.startswith("lmforge."):
                continue
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            found.append((target, node.lineno))
    return found


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = all_modules()
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def upward_imports(modules, graph) -> list[str]:
    problems = []
    for name, edges in graph.items():
        rank = STAGES.index(stage_of(name))
        for target, line in edges:
            if target == "lmforge":
                continue
            if STAGES.index(stage_of(target)) > rank:
                rel = modules[name].relative_to(SRC.parent)
                problems.append(f"{rel}:{line}: {stage_of(name)} imports {target} ({stage_of(target)} comes later)")
    return problems


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph.get(node, []):
            if target == node or target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe_cycle(component: list[str], modules, graph) -> str:
    members = set(component)
    edges = [f"{modules[a].relative_to(SRC.parent)}:{line} imports {b}"
             for a in component for b, line in graph[a] if b in members and b != a]
    return "cycle: " + "; ".join(edges)


def test_every_module_belongs_to_a_stage():
    for name in all_modules():
        stage_of(name)


def test_no_stage_imports_a_later_stage():
    modules, graph = import_graph()
    problems = upward_imports(modules, graph)
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    modules, graph = import_graph()
    found = [describe_cycle(c, modules, graph) for c in cycles(graph)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from lmforge.train.trainer import train\n", "curation imports lmforge.train.trainer (train comes later)"),
    ("def f():\n    from lmforge.model import directory\n", "curation imports lmforge.model.directory"),
])
def test_checker_catches_an_upward_import(tmp_path, monkeypatch, source, expected):
    modules, graph = import_graph()
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    name = "lmforge.curation.bad"
    monkeypatch.setitem(modules, name, SRC / "lmforge" / "curation" / "bad.py")
    graph = {**graph, name: imports_of(name, bad, modules)}
    problems = upward_imports(modules, graph)
    assert any(expected in p for p in problems), problems


def test_checker_catches_a_cycle():
    graph = {"lmforge.core.a": [("lmforge.core.b", 3)], "lmforge.core.b": [("lmforge.core.a", 7)]}
    modules = {"lmforge.core.a": SRC / "lmforge/core/a.py", "lmforge.core.b": SRC / "lmforge/core/b.py"}
    (component,) = cycles(graph)
    assert "lmforge/core/a.py:3 imports lmforge.core.b" in describe_cycle(component, modules, graph)
