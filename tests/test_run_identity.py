"""Run identity survives code growth: a stored config.yaml is compared with a config by value, after today's
loader re-validates it (defaults filled), never by text. Fast: no training, hand-written run folders."""

from __future__ import annotations

import pytest
import yaml
from conftest import make_config

from workbench.config import CONFIG_SCHEMA_VERSION, config_differences, dump_config, stored_schema_version
from workbench.results import CONFIG_FILE, write_summary
from workbench.train import RunExistsError, check_run_dir


def stored_run(tmp_path, config, edit=None, header: bool = True, status: str = "complete"):
    """A run folder whose config.yaml is ``config`` as stored, optionally edited (a dict -> dict function)."""
    values = yaml.safe_load(dump_config(config))
    if edit is not None:
        edit(values)
    text = yaml.safe_dump(values, sort_keys=False)
    if header:
        text = f"# workbench run config, schema {CONFIG_SCHEMA_VERSION}\n" + text
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(text)
    write_summary(run_dir, status=status)
    return run_dir


def drop_defaulted_keys(values):
    """What an older workbench stored: no trainer.keep_checkpoints / model.norm keys (today they have defaults)."""
    del values["trainer"]["keep_checkpoints"]
    del values["model"]["norm"]


def test_dump_records_the_schema_version_and_round_trips():
    config = make_config({"objective": {"name": "dual"}, "algorithms": {"token_masking": {"rate": 0.25}}})
    text = dump_config(config)
    assert text.startswith(f"# workbench run config, schema {CONFIG_SCHEMA_VERSION}\n")
    assert stored_schema_version(text) == CONFIG_SCHEMA_VERSION
    assert stored_schema_version(text.split("\n", 1)[1]) == 1  # no header: written before versioning
    assert yaml.safe_load(text)["objective"]["name"] == "dual"


def test_stored_config_lacking_a_key_that_now_has_a_default_is_the_same_run(tmp_path):
    """Before: config.yaml was compared as text with today's dump, so any new defaulted key changed every run."""
    config = make_config()
    for header in (True, False):  # with the schema header, and an older file without one
        run_dir = stored_run(tmp_path / str(header), config, drop_defaulted_keys, header=header)
        assert config_differences(run_dir / CONFIG_FILE, config) == []
        assert check_run_dir(config, run_dir, resume=True) == "complete"
        write_summary(run_dir, status="running")
        assert check_run_dir(config, run_dir, resume=True) == "resume"
    # key order and YAML formatting do not matter either
    run_dir = tmp_path / "flow"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(yaml.safe_load(dump_config(config)), default_flow_style=True,
                                                      sort_keys=True))
    assert check_run_dir(config, run_dir, resume=True) == "resume"  # no summary yet: an interrupted run


def test_a_changed_value_is_refused_with_the_dotted_key_named(tmp_path):
    config = make_config()
    run_dir = stored_run(tmp_path, config, lambda v: v["optimizer"].update(lr=0.001))
    with pytest.raises(RunExistsError, match="different config") as caught:
        check_run_dir(config, run_dir, resume=True)
    message = str(caught.value)
    assert "optimizer.lr (stored 0.001, now 0.003)" in message and "\n" not in message
    # a stored key that differs from today's default is a real difference too (it is not filled, it is stored)
    run_dir = stored_run(tmp_path / "b", config, lambda v: v["trainer"].update(keep_checkpoints=5))
    assert config_differences(run_dir / CONFIG_FILE, config) == ["trainer.keep_checkpoints (stored 5, now 2)"]
    # a section switched on in one of them
    masked = make_config({"algorithms": {"token_masking": {"rate": 0.25}}})
    differences = config_differences(stored_run(tmp_path / "c", config) / CONFIG_FILE, masked)
    assert len(differences) == 1 and differences[0].startswith("algorithms.token_masking (stored None, now {")
    assert config_differences(run_dir / CONFIG_FILE, config, ignore=("trainer.keep_checkpoints",)) == []


def test_stored_configs_that_cannot_be_compared_are_refused_naming_why(tmp_path):
    config = make_config()
    newer = stored_run(tmp_path / "newer", config)
    text = (newer / CONFIG_FILE).read_text()
    (newer / CONFIG_FILE).write_text(text.replace(f"schema {CONFIG_SCHEMA_VERSION}", f"schema "
                                                                                     f"{CONFIG_SCHEMA_VERSION + 1}"))
    with pytest.raises(RunExistsError, match=f"schema {CONFIG_SCHEMA_VERSION + 1}, this workbench reads schema"):
        check_run_dir(config, newer, resume=True)
    removed = stored_run(tmp_path / "removed", config, lambda v: v["model"].update(n_layrs=3))
    with pytest.raises(RunExistsError, match=r"model\.n_layrs: unknown key"):
        check_run_dir(config, removed, resume=True)


def test_tune_adopts_a_retried_trial_stored_before_a_key_gained_a_default(tmp_path):
    """A retried Optuna trial reuses its failed attempt's run when only the name differs; the attempt's config.yaml
    may predate a defaulted key (before: compared as a dict with today's dump, so it was never adopted)."""
    from workbench.tune.worker import _adopt_attempt

    config = make_config({"name": "study-t3-seed7"})
    previous = stored_run(tmp_path / "t1", make_config({"name": "study-t1-seed7"}), drop_defaulted_keys)
    messages: list[str] = []
    assert _adopt_attempt(previous, tmp_path / "t3", config, messages.append)
    assert "reusing the completed run" in messages[0]
    assert config_differences(tmp_path / "t3" / CONFIG_FILE, config) == []
    changed = stored_run(tmp_path / "t2", make_config({"name": "study-t2-seed7", "optimizer": {"lr": 0.01}}))
    assert not _adopt_attempt(changed, tmp_path / "t4", config, messages.append)
    assert not (tmp_path / "t4").exists()


def test_the_progress_display_is_not_part_of_a_runs_identity(tmp_path):
    """trainer.progress_bar only changes what a terminal shows (like loggers:): a run stored with the bar off is
    resumed with it on, and the other way round. Before: refused as a different config (trainer.progress_bar)."""
    for stored_bar in (False, True):
        stored = make_config({"trainer": {"progress_bar": stored_bar}})
        run_dir = stored_run(tmp_path / str(stored_bar), stored, status="running")
        toggled = make_config({"trainer": {"progress_bar": not stored_bar}})
        assert check_run_dir(toggled, run_dir, resume=True) == "resume"
        write_summary(run_dir, status="complete")
        assert check_run_dir(toggled, run_dir, resume=True) == "complete"
    # a trainer key that changes the run is still one
    with pytest.raises(RunExistsError, match=r"trainer\.log_interval \(stored 4, now 5\)"):
        check_run_dir(make_config({"trainer": {"log_interval": 5}}), run_dir, resume=True)
