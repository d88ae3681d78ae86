"""The package's import graph: no cycle anywhere (imports inside functions included), and click and the
command-line options stay in the command modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdist"
COMMANDS = {"cli", "options", "train", "distill", "evaluate", "shards", "wandb_report"}  # the click layer


def kdist_imports(path: Path) -> set[str]:
    """The kdist modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists())
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdist."):
            found.add(node.module.split(".")[1])
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {path.stem: kdist_imports(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def test_no_import_cycle():
    graph, state, path = import_graph(), {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(other) :] + [other]))
            if other not in state:
                visit(other)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_library_modules_do_not_import_click_or_options():
    for path in PACKAGE.glob("*.py"):
        if path.stem in COMMANDS or path.stem == "__init__":
            continue
        text = path.read_text()
        assert "import click" not in text and "options" not in kdist_imports(path), path.name
