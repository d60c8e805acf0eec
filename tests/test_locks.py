"""One inter-process file lock (datasets_prep.cache.exclusive) behind every lock the workbench takes."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from datasets_prep.cache import exclusive


def _blocks_until_released(target: Path, second) -> None:
    """While ``exclusive(target)`` is held, entering ``second()`` waits; it enters once the lock is released."""
    entered = threading.Event()

    def enter() -> None:
        with second():
            entered.set()

    with exclusive(target):
        thread = threading.Thread(target=enter, daemon=True)
        thread.start()
        assert not entered.wait(0.5), "the second holder did not wait"
    assert entered.wait(10), "the second holder never got the lock"
    thread.join(10)


def test_exclusive_waits_and_says_so(tmp_path: Path) -> None:
    said = []
    _blocks_until_released(tmp_path / "out", lambda: exclusive(tmp_path / "out", waiting=lambda: said.append(1)))
    assert said == [1]


def test_streaming_registration_takes_the_same_lock() -> None:
    """It used its own flock on another file: a holder of one did not exclude the other."""
    from workbench.data import streaming_registration_lock

    _blocks_until_released(Path(tempfile.gettempdir()) / "workbench_streaming_register", streaming_registration_lock)


def test_one_lock_helper_and_one_prepare_data() -> None:
    """No module takes a file lock of its own (trackers and data each had an fcntl.flock helper), and one function
    is named prepare_data (the study worker had a second one, a plain wrapper of prepare())."""
    import ast

    import workbench

    root = Path(workbench.__path__[0])
    flock, prepare_data = [], []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("flock", "lockf"):
                flock.append(f"{path.relative_to(root)}:{node.lineno}")
        prepare_data += [str(path.relative_to(root)) for node in tree.body
                         if isinstance(node, ast.FunctionDef) and node.name == "prepare_data"]
    assert not flock, f"use datasets_prep.cache.exclusive: {flock}"
    assert prepare_data == ["ablate/runner.py"]
