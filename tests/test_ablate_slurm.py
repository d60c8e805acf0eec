"""`workbench ablate --executor slurm`: the slurm: section and flags become the sbatch script submitit writes (no
cluster needed), bad values are named before anything is submitted, and the submission path runs end to end
through submitit's local executor (real processes; only the scheduler differs): the command returns at once, a
rerun while the job runs submits nothing, the job trains the run, a later rerun finds it complete."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import submitit
import yaml
from ablation_smoke import DEMO
from conftest import TINY
from test_ablate_concurrency import check_complete_rows

from workbench import claims
from workbench.ablate import load_ablation
from workbench.ablate.slurm import make_executor
from workbench.commands import ablate as ablate_command
from workbench.config import ConfigError
from workbench.paths import REPO_ROOT


def cli_args(path: Path, *extra: str, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ablate_command.add_arguments(parser)
    args = parser.parse_args([str(path), "--no-probe", *extra])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def write_ablation(tmp_path: Path, slurm: object) -> Path:
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump({"name": "sl", "base": TINY, "variants": {"a": {}, "b": {"optimizer.lr": 0.001},
                                                                             "c": {"optimizer.lr": 0.002}},
                                    "slurm": slurm}, sort_keys=False))
    return path


def test_slurm_section_and_flags_make_the_sbatch_script(tmp_path, monkeypatch):
    path = write_ablation(tmp_path, {"partition": "gpu", "gpus_per_run": 2, "time": "1-02:30:00", "account": "lab",
                                     "cpus_per_run": 16, "mem": "128G", "setup": ["module load cuda"],
                                     "sbatch": {"constraint": "a100", "qos": "low"}})
    args = cli_args(path, "--executor", "slurm", "--gpus-per-run", "4", "--sbatch", "qos=high",
                    "--sbatch=--mail-type=END")
    ablation = load_ablation(path)
    spec = ablate_command._slurm_spec(args, ablation)
    assert (spec.partition, spec.gpus_per_run, spec.time_min, spec.account) == ("gpu", 4, 1590, "lab")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    executor = make_executor("slurm", tmp_path / "jobs", spec, "workbench-sl")
    executor.parameters["map_count"] = 3  # what map_array sets for three runs
    lines = executor._make_submission_file_text("python -m task", "uid").splitlines()
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --time=1590",
                     "#SBATCH --account=lab", "#SBATCH --cpus-per-task=16", "#SBATCH --mem=128G",
                     "#SBATCH --constraint=a100", "#SBATCH --qos=high", "#SBATCH --mail-type=END",
                     "#SBATCH --job-name=workbench-sl", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --array=0-2%3", "module load cuda"):
        assert expected in lines, (expected, lines)


@pytest.mark.parametrize(("slurm", "flags", "message"), [
    ({"gpus": 2}, [], r"slurm\.gpus: unknown key"),
    ({"gpus_per_run": -1}, [], r"slurm\.gpus_per_run: expected a whole number >= 0"),
    ({"time": "soon"}, [], r"slurm\.time: expected minutes > 0, HH:MM:SS or D-HH:MM:SS"),
    ({"sbatch": ["a"]}, [], r"slurm\.sbatch: expected a mapping"),
    ("gpu", [], r"slurm: expected a mapping"),
    (None, ["--sbatch", "constraint"], r"--sbatch: expected OPTION=VALUE"),
    (None, ["--time", "0"], r"slurm\.time: "),
])
def test_bad_slurm_settings_are_named_before_anything_is_submitted(tmp_path, capsys, slurm, flags, message):
    path = write_ablation(tmp_path, slurm)
    with pytest.raises(ConfigError, match=message):
        ablate_command.run(cli_args(path, "--executor", "slurm", *flags))
    assert capsys.readouterr().out == ""  # before the plan (and its throughput probe)


@pytest.mark.slow
def test_submission_through_submitits_local_executor_trains_each_run_once(tmp_path, capsys):
    root = tmp_path / "results"
    args = cli_args(DEMO, "--smoke", "--only", "ar", "--executor", "submitit-local", "--results", str(root))
    start = time.time()
    assert ablate_command.run(args) == 0
    out = capsys.readouterr().out
    assert "submitted 1 task(s) to submitit's local executor" in out, out
    assert time.time() - start < 120  # returns without waiting for the run
    run_dir = root / "demo" / "ar" / "seed0"
    holder = claims.current(run_dir)
    assert holder is not None and claims.alive(holder[1])
    assert ablate_command.run(args) == 0  # a rerun while the job lives submits nothing
    again = capsys.readouterr().out
    assert "held by local job" in again and "nothing to submit" in again, again
    deadline = time.time() + 600
    while claims.current(run_dir) is not None:  # the job releases the claim when it is done
        assert time.time() < deadline, "the local job did not finish"
        time.sleep(1)
    check_complete_rows(run_dir)
    assert ablate_command.run(args) == 0
    assert "all 1 runs are complete; nothing to submit" in capsys.readouterr().out


STUDY = REPO_ROOT / "ablations" / "studies" / "token_masking_rate.yaml"


def test_tune_slurm_workers_need_a_server_storage(capsys):
    from workbench.cli import main

    assert main(["tune", str(STUDY), "--smoke", "--executor", "slurm", "--workers", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line: --storage: Slurm workers run on several nodes") and "SQLite" in err


@pytest.mark.slow
def test_tune_workers_submitted_through_submitits_local_executor_finish_the_study(results_root, capsys):
    import optuna

    from workbench.cli import main

    start = time.time()
    assert main(["tune", str(STUDY), "--smoke", "--executor", "submitit-local", "--workers", "2"]) == 0
    assert "submitted 2 task(s) to submitit's local executor" in capsys.readouterr().out
    folder = results_root / "token_masking_rate-smoke" / ".submitit"
    while len(list(folder.glob("*_result.pkl"))) < 2:  # both workers (array tasks) returned
        assert time.time() - start < 600, "the submitted tune workers did not finish"
        time.sleep(1)
    for job in folder.glob("*_result.pkl"):
        assert submitit.LocalJob(folder, job.name.split("_")[0]).result() == 0
    study = optuna.load_study(study_name="token_masking_rate-smoke",
                              storage=f"sqlite:///{results_root / 'token_masking_rate-smoke' / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2 and len({t.number for t in complete}) == 2
