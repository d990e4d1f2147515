"""The package layout: no import cycles among MOSAIC's modules, and the layering DESIGN.md fixes.

Every import counts, wherever it stands: at module level, inside a function (a lazy import is
still a dependency) and under `if TYPE_CHECKING:` (a type-only dependency still couples the
modules). Importing a submodule does not count as importing its package's `__init__`.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> import name, as pyproject.toml's package-dir installs them.
PACKAGES = {"mosaic": "mosaic", "agents": "mosaic.agents", "prompts": "mosaic.prompts",
            "tools": "mosaic.tools", "training": "mosaic.training", "eval": "mosaic.eval"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = path
    return out


def _imports(path: Path, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of MOSAIC that `module` imports (resolved to the deepest known module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import name` imports pkg.name when that is a module, else pkg.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


@lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, m, p.name == "__init__.py", known) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the project, not an empty folder
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _reaches(graph: dict[str, set[str]], start: str, prefix: str) -> list[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in graph.get(m, ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return sorted(n for n in seen if n == prefix or n.startswith(prefix + "."))


@pytest.mark.parametrize("module, forbidden", [
    ("mosaic.config", "mosaic.eval"),  # config is below everything
    ("mosaic.schemas", "mosaic.config"),
    ("mosaic.eval", "mosaic.training"),  # eval/ knows nothing about training
    ("mosaic.eval", "mosaic.tools"),
    ("mosaic.eval", "mosaic.agents"),
    ("mosaic.training", "mosaic.agents"),  # training/ knows nothing about the planner
    ("mosaic.training", "mosaic.tools"),
    ("mosaic.training", "mosaic.sandbox"),
    ("mosaic.tools", "mosaic.agents"),  # tools run without the graph
])
def test_layering(module, forbidden):
    graph = import_graph()
    starts = [m for m in graph if m == module or m.startswith(module + ".")]
    bad = {s: _reaches(graph, s, forbidden) for s in starts}
    assert {s: r for s, r in bad.items() if r} == {}


def test_agents_tools_and_the_cli_import_no_heavy_libraries():
    """`mosaic --help` answers instantly: the graph, the planners, the tools and the CLI load no
    torch/transformers/peft/trl/datasets at import time (their heavy work imports them when it
    runs)."""
    import subprocess
    import sys

    modules = [m for m in import_graph() if m.startswith(("mosaic.agents", "mosaic.tools"))]
    code = ("import importlib, sys\n"
            f"for m in {modules + ['mosaic.cli']!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
