"""Import structure: no import cycles between workbench modules (deferred imports inside functions count: they
are dependencies too), and the command line builds its parser without torch or other heavy libraries."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "workbench"

# Cycles that exist today in modules owned elsewhere, each through deferred imports only; remove an entry when its
# cycle is gone. Any other cycle fails the test.
KNOWN_CYCLES = {
    frozenset({"workbench.evaluation.scoring", "workbench.evaluation.tasks"}):
        "scoring reads tasks.LANGUAGE_MODELING inside a function; tasks calls scoring inside functions",
    frozenset({"workbench.trackers", "workbench.train"}):
        "trackers imports train.active_algorithms inside a function",
}


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Workbench modules ``name`` imports anywhere in its file (module level or in functions), except under
    ``if TYPE_CHECKING:``. ``from pkg import sub`` counts as importing ``pkg.sub`` (not ``pkg``'s other names)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for statement in block.body for node in ast.walk(statement)}
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
    out = set()
    for target in targets:
        while target and target not in known:  # workbench.x.func -> workbench.x; other packages drop out
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm; components of more than one module are import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in graph[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_checker_finds_a_deferred_cycle(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    (tmp_path / "a.py").write_text("from pkg.b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg import c\n")
    (tmp_path / "c.py").write_text("from pkg.a import x\nif TYPE_CHECKING:\n    import pkg.b\n")
    known = {"pkg.a", "pkg.b", "pkg.c"}
    graph = {name: imported_modules(name, tmp_path / f"{name[4:]}.py", known) for name in known}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert strongly_connected(graph) == [known]


def test_no_import_cycles():
    files = module_files()
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    cycles = [sorted(c) for c in strongly_connected(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, f"import cycles between workbench modules: {cycles}"
