"""Global options (--data-dir) are accepted before and after the command name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from workbench.cli import main


@pytest.fixture
def run_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "cli-options", "optimizer": {"lr": 0.001}}))
    return path


@pytest.mark.parametrize("where", ["before", "after", "after-with-override"])
def test_data_dir_before_or_after_the_command(where: str, run_yaml: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("WORKBENCH_DATA", "/elsewhere")
    data = tmp_path / "data"
    argv = {"before": ["--data-dir", str(data), "train", str(run_yaml), "--check"],
            "after": ["train", str(run_yaml), "--check", "--data-dir", str(data)],
            "after-with-override": ["train", str(run_yaml), "--data-dir", str(data), "optimizer.lr=0.01", "--check"],
            }[where]
    assert main(argv) == 0
    assert os.environ["WORKBENCH_DATA"] == str(data)
    if where == "after-with-override":
        assert "lr: 0.01" in capsys.readouterr().out

