"""Composer's engine patch (workbench/composer_patches.py): applied once, only on the pinned Composer version,
and ENGINE_DEBUG still works."""

from __future__ import annotations

import warnings

import pytest
from composer.core.engine import Engine

from workbench import composer_patches


def test_applied_once_at_import_on_the_pinned_version() -> None:
    import composer

    assert composer.__version__ == composer_patches.PINNED_COMPOSER == "0.32.1"
    assert composer_patches.ENGINE_PATCHED
    patched = Engine._debug_log
    assert patched.__wrapped__ is not None
    assert composer_patches.patch_engine_debug_log() and Engine._debug_log is patched  # not wrapped twice


def test_another_composer_version_keeps_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Engine._debug_log.__wrapped__
    monkeypatch.setattr(Engine, "_debug_log", original)
    with pytest.warns(UserWarning, match="Composer 0.33.0 is installed, the workbench pins 0.32.1"):
        assert not composer_patches.patch_engine_debug_log("0.33.0")
    assert Engine._debug_log is original


def test_engine_debug_still_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(Engine, "_debug_log", lambda self, event, msg: calls.append(msg))
    assert composer_patches.patch_engine_debug_log()
    monkeypatch.delenv("ENGINE_DEBUG", raising=False)
    Engine._debug_log(None, None, "quiet")
    monkeypatch.setenv("ENGINE_DEBUG", "1")
    Engine._debug_log(None, None, "loud")
    assert calls == ["loud"]


def test_building_runs_does_not_patch_again(tiny_config, tmp_path) -> None:
    """build_run used to assign a new lambda to Engine._debug_log on every build (process-wide, unguarded)."""
    from workbench.train import build_run

    seen = []
    for index in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = build_run(tiny_config({"name": f"patch-{index}"}), run_dir=tmp_path / str(index))
        seen.append(Engine._debug_log)
        built.trainer.close()
    assert seen[0] is seen[1] and getattr(seen[0], "__wrapped__", None) is not None
