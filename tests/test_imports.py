"""Import structure: no import cycles between workbench modules, and the command line builds its parser without
torch or other heavy libraries.

A cycle fails the test when it runs at import time (module-level imports only: a partially initialised module), or
when it crosses packages through any imports, deferred ones inside functions included (lm -> evaluation.scoring
-> evaluation.tasks -> lm was one: a library layer depending on what depends on it). Modules of one package that
call each other through deferred imports (evaluation.scoring <-> evaluation.tasks) are one component and pass."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parent.parent / "workbench"
HEAVY = ("torch", "composer", "streaming", "optuna", "polars", "pyarrow", "numpy", "matplotlib", "seaborn",
         "tokenizers", "datasets", "sqlalchemy", "torchmetrics")

def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> dict[str, bool]:
    """Workbench modules ``name`` imports -> whether at import time (module or class level; False: only inside
    functions). ``if TYPE_CHECKING:`` blocks do not count; ``from pkg import sub`` imports ``pkg.sub``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for statement in block.body for node in ast.walk(statement)}
    deferred = {id(node) for function in ast.walk(tree) if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
                for node in ast.walk(function)}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            while target and target not in known:  # workbench.x.func -> workbench.x; other packages drop out
                target = target.rpartition(".")[0]
            if target and target != name:
                out[target] = out.get(target, False) or id(node) not in deferred
    return out


def import_graph() -> dict[str, dict[str, bool]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def bad_cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Import-time cycles, and cycles (through any imports) whose modules are not all in one package."""
    eager = {name: {t for t, at_import in targets.items() if at_import} for name, targets in graph.items()}
    found = [sorted(c) for c in strongly_connected(eager)]
    for component in strongly_connected({name: set(targets) for name, targets in graph.items()}):
        if len({module.rpartition(".")[0] for module in component}) > 1 and sorted(component) not in found:
            found.append(sorted(component))
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components (networkx, which torch requires); those of more than one module are cycles."""
    import networkx

    digraph = networkx.DiGraph()
    digraph.add_nodes_from(graph)
    digraph.add_edges_from((node, child) for node, children in graph.items() for child in children)
    return [set(c) for c in networkx.strongly_connected_components(digraph) if len(c) > 1]


def test_checker_finds_cycles(tmp_path):
    """The checker itself: a cross-package cycle closed by an import inside a function is found, an import-time
    cycle within one package is found, a deferred one within one package passes."""
    files = {"pkg.a": "from pkg.sub.b import f\n", "pkg.sub.b": "def f():\n    from pkg import c\n",
             "pkg.c": "from pkg.a import x\nif TYPE_CHECKING:\n    import pkg.sub.b\n",
             "pkg.d": "import pkg.e\n", "pkg.e": "from pkg import d\n",
             "pkg.f": "import pkg.g\n", "pkg.g": "def h():\n    import pkg.f\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    graph = {name: imported_modules(name, tmp_path / f"{name}.py", set(files)) for name in files}
    assert graph["pkg.sub.b"] == {"pkg.c": False} and graph["pkg.c"] == {"pkg.a": True}
    assert sorted(bad_cycles(graph)) == [["pkg.a", "pkg.c", "pkg.sub.b"], ["pkg.d", "pkg.e"]]


def test_no_import_cycles():
    cycles = bad_cycles(import_graph())
    assert not cycles, f"import cycles between workbench modules: {cycles}"


HELP_PROBE = """
import json, sys
from workbench.cli import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_imports_no_heavy_library(command):
    """``workbench [COMMAND] --help`` builds every subcommand's parser; it must not import torch & co. (they took
    seconds): heavy imports belong inside the commands' ``run``. Checks sys.modules, not time."""
    argv = [command, "--help"] if command else ["--help"]
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, json.dumps(argv)], capture_output=True, text=True,
                         check=True, timeout=120)
    assert "usage: workbench" in out.stdout
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & set(HEAVY), f"workbench {' '.join(argv)} imported {sorted(loaded & set(HEAVY))}"
