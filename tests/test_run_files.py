"""Each run-folder file name is defined once (workbench/run_files.py); no module spells one out again."""

from __future__ import annotations

import ast
from pathlib import Path

from workbench import run_files

NAMES = {value: name for name, value in vars(run_files).items() if name.isupper() and isinstance(value, str)}


def test_no_module_spells_out_a_run_file_name() -> None:
    root = Path(run_files.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "run_files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in NAMES:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.value!r} "
                             f"(use workbench.run_files.{NAMES[node.value]})")
    assert not found, "\n".join(found)


def test_results_reexports_the_names() -> None:
    from workbench import results

    for value, name in NAMES.items():
        assert getattr(results, name) == value
