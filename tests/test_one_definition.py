"""One definition of each helper (issue 15): helpers that did the same job in two modules are defined once, and
two functions of one name with different meanings were renamed so each name says what it does.

Also the shared run-folder JSON reader: a damaged summary.json or variant.json leaves a run's rows loadable (the
results loader's own copy of the reader stopped at a non-UTF-8 file with a UnicodeDecodeError)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import make_config

PACKAGE = Path(__file__).resolve().parent.parent / "workbench"

# each was defined twice: the same logic (format_seconds, the run-folder JSON reader) or one name for two jobs
# (load_run: a checkpoint's model vs. a results folder's rows; tokens_in_batch: packed sequences vs. task rows;
# _Heartbeat: an Optuna trial's heartbeat vs. run claims; _seeds: a study's count vs. an ablation's seed)
ONCE = ("format_seconds", "read_json_object", "_read_json", "load_run", "tokens_in_batch", "_Heartbeat", "_seeds")


def module_level_definitions() -> dict[str, list[str]]:
    """Function and class names defined at module level anywhere in the package -> the files defining them."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.setdefault(node.name, []).append(str(path.relative_to(PACKAGE.parent)))
    return found


def test_shared_helpers_are_defined_once():
    found = module_level_definitions()
    assert {name: found[name] for name in ONCE if len(found.get(name, [])) > 1} == {}
    assert found["read_json_object"] == ["workbench/results.py"]


def test_damaged_json_records_leave_the_run_loadable(tmp_path):
    from workbench.analysis import load_results
    from workbench.results import SUMMARY_FILE, VARIANT_FILE, MetricsWriter, read_json_object, read_summary
    from workbench.trackers import run_group

    config = make_config({"name": "damaged"})
    run_dir = tmp_path / "ablation" / "ar" / "seed0"
    writer = MetricsWriter(run_dir, {"config": config.to_dict()})
    for epoch in (1, 2):
        writer.add(run=config.name, step=10 * epoch, epoch=float(epoch), tokens_seen=1000 * epoch,
                   unique_tokens=1000, split="val", metric="ar_nll", value=5.0 - epoch, wall_time=float(epoch))
    writer.flush()
    (run_dir / SUMMARY_FILE).write_bytes(b'{"status": "compl\xe9te"}')  # Latin-1, not UTF-8
    (run_dir / VARIANT_FILE).write_bytes(b'{"variant": "\xff"}')

    assert read_json_object(run_dir / SUMMARY_FILE) is None and read_summary(run_dir) is None
    assert read_json_object(run_dir / "missing.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json_object(tmp_path / "list.json") is None  # a record is an object
    frame = load_results(tmp_path / "ablation")
    assert frame.filter(frame["split"] == "val")["value"].to_list() == [4.0, 3.0]
    assert run_group(run_dir)["kind"] is None
