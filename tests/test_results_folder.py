"""A results folder that is a regular file is one error line naming it, before any plan, study or data preparation
(`workbench train` already checked its run folder; `ablate` and `tune` stopped with a NotADirectoryError traceback
from the claims or the SQLite storage)."""

from __future__ import annotations

import yaml
from conftest import TINY
from test_tune import write_study

from workbench.cli import main


def test_ablate_refuses_a_results_folder_that_is_a_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump({"base": TINY, "name": "rf", "variants": {"ar": {}}}, sort_keys=False))
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    for argv, hint in (([str(path), "--results", str(blocker)], "pass --results with a writable folder"),
                       ([str(path), "--dry-run"], "set WORKBENCH_RESULTS to a writable folder")):
        monkeypatch.setenv("WORKBENCH_RESULTS", str(blocker / "inside"))
        assert main(["ablate", *argv, "--no-probe"]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: results folder ") and f"{blocker} is a regular file" in captured.err
        assert hint in captured.err and captured.err.count("\n") == 1
        assert "estimated time" not in captured.out  # refused before the plan
    assert blocker.read_text() == "not a folder"


def test_tune_refuses_a_results_folder_that_is_a_file(tmp_path, capsys, monkeypatch):
    path = write_study(tmp_path, "rf-study")
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WORKBENCH_RESULTS", str(blocker))
    for extra in ([], ["--storage", f"sqlite:///{tmp_path / 'elsewhere.db'}"]):  # trials would fail one by one
        assert main(["tune", str(path), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.err == (f"error: study results folder {blocker / 'rf-study'}: {blocker} is a regular file, "
                                "not a folder; set WORKBENCH_RESULTS to a writable folder\n")
        assert "[tune] trial" not in captured.out
    assert not (tmp_path / "elsewhere.db").exists()  # refused before the study was opened
