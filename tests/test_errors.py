"""Bad inputs to ``workbench train`` (and the YAML readers of ``ablate`` and ``tune``): each one exits non-zero
with one line naming the file or dotted key and what is allowed, no traceback, before any data is prepared or
any run folder is written, and leaves earlier results untouched (issue 12, "Config files" and the results
folder)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from workbench.cli import main
from workbench.paths import REPO_ROOT

# every run file below includes tiny.yaml (the test suite's tiny config, batch 16) unless it is about base: itself
TINY_BASE = "base: tiny.yaml\n"

# (id, files written into the case folder, argv after `workbench`, environment, expected parts of the line,
#  parts that must not appear)
CASES = [
    ("lr-inf", {"run.yaml": TINY_BASE + "optimizer: {lr: .inf}\n"}, ["train", "run.yaml"], {},
     ["run.yaml: optimizer.lr: ", "finite number", "inf"], []),
    ("lr-nan", {"run.yaml": TINY_BASE + "optimizer: {lr: .nan}\n"}, ["train", "run.yaml"], {},
     ["run.yaml: optimizer.lr: ", "finite number", "nan"], []),
    ("betas-nan", {"run.yaml": TINY_BASE + "optimizer: {betas: [0.9, .NaN]}\n"}, ["train", "run.yaml"], {},
     ["run.yaml: optimizer.betas[1]: ", "finite number"], []),
    ("clip-neg-inf", {"run.yaml": TINY_BASE + "trainer: {grad_clip_norm: -.inf}\n"}, ["train", "run.yaml"], {},
     ["run.yaml: trainer.grad_clip_norm: ", "finite number"], []),
    ("override-inf", {"run.yaml": TINY_BASE}, ["train", "run.yaml", "optimizer.lr=inf"], {},
     ["command line: optimizer.lr: ", "finite number"], ["run.yaml"]),
    ("microbatch-0", {"run.yaml": TINY_BASE + "trainer: {microbatch_size: 0}\n"}, ["train", "run.yaml"], {},
     ["run.yaml: trainer.microbatch_size: ", ">= 1"], []),
    ("microbatch-not-divisor", {"run.yaml": TINY_BASE + "trainer: {microbatch_size: 5}\n"}, ["train", "run.yaml"],
     {}, ["trainer.microbatch_size: ", "divide", "16", "1, 2, 4, 8, 16"], []),
    ("batch-over-3-processes", {"run.yaml": TINY_BASE}, ["train", "run.yaml"], {"WORLD_SIZE": "3", "RANK": "0"},
     ["data.batch_size: ", "16", "3 processes", "multiple of 3"], []),
    ("eval-batch-over-3-processes", {"run.yaml": TINY_BASE + "data: {batch_size: 24}\n"}, ["train", "run.yaml"],
     {"WORLD_SIZE": "3", "RANK": "0"}, ["tiny.yaml: eval.batch_size: ", "32", "3 processes"], []),
    ("microbatch-over-2-processes", {"run.yaml": TINY_BASE + "trainer: {microbatch_size: 16}\n"},
     ["train", "run.yaml"], {"WORLD_SIZE": "2", "RANK": "0"},
     ["trainer.microbatch_size: ", "per-process batch of 8", "2 processes"], []),
    ("base-cycle", {"a.yaml": "base: b.yaml\nname: a\n", "b.yaml": "base: a.yaml\nseed: 1\n"}, ["train", "a.yaml"],
     {}, ["base: ", "cycle", "a.yaml -> ", "b.yaml -> ", "a.yaml"], ["RecursionError"]),
    ("base-self", {"run.yaml": "base: run.yaml\nname: a\n"}, ["train", "run.yaml"], {},
     ["run.yaml: base: ", "cycle", "run.yaml -> ", "run.yaml"], []),
    ("base-missing", {"run.yaml": "base: nothere.yaml\n"}, ["train", "run.yaml"], {},
     ["run.yaml: base: ", "nothere.yaml", "not found"], []),
    ("base-not-a-path", {"run.yaml": "base: 3\nname: a\n"}, ["train", "run.yaml"], {},
     ["run.yaml: base: ", "path of another run YAML"], []),
    ("value-in-base", {"mid.yaml": TINY_BASE + "model: {n_layers: zero}\n", "run.yaml": "base: mid.yaml\nname: x\n"},
     ["train", "run.yaml"], {}, ["mid.yaml: model.n_layers: ", "expected an integer"], ["run.yaml"]),
    ("unknown-key-in-base", {"mid.yaml": TINY_BASE + "model: {n_layrs: 2}\n", "run.yaml": "base: mid.yaml\n"},
     ["train", "run.yaml"], {}, ["mid.yaml: model.n_layrs: ", "unknown key"], ["run.yaml"]),
    ("empty-file", {"run.yaml": ""}, ["train", "run.yaml"], {}, ["run.yaml: ", "empty"], []),
    ("comment-only-file", {"run.yaml": "# nothing here yet\n\n"}, ["train", "run.yaml"], {},
     ["run.yaml: ", "empty"], []),
    ("duplicate-top-key", {"run.yaml": TINY_BASE + "seed: 1\nseed: 2\n"}, ["train", "run.yaml"], {},
     ["run.yaml: seed: ", "duplicate key", "line 3", "line 2"], []),
    ("duplicate-nested-key", {"run.yaml": TINY_BASE + "model:\n  n_layers: 2\n  n_layers: 3\n"}, ["train", "run.yaml"],
     {}, ["run.yaml: model.n_layers: ", "duplicate key", "line 4"], []),
    ("duplicate-key-in-base", {"mid.yaml": TINY_BASE + "seed: 1\nseed: 2\n", "run.yaml": "base: mid.yaml\n"},
     ["train", "run.yaml"], {}, ["mid.yaml: seed: ", "duplicate key", "line 3"], []),
    ("duplicate-key-in-override", {"run.yaml": TINY_BASE}, ["train", "run.yaml", "model={{n_layers: 2, n_layers: 3}}"],
     {}, ["command line: model.n_layers: ", "duplicate key"], []),
    ("not-utf8", {"run.yaml": TINY_BASE.encode() + b"name: caf\xe9\n"}, ["train", "run.yaml"], {},
     ["run.yaml: ", "not UTF-8", "line 2"], ["UnicodeDecodeError"]),
    ("invalid-yaml", {"run.yaml": TINY_BASE + "model: {n_layers: 2\n"}, ["train", "run.yaml"], {},
     ["run.yaml: ", "not valid YAML", "line 3"], []),
    ("config-is-a-folder", {"sub/x.yaml": "name: x\n"}, ["train", "sub"], {}, ["sub: ", "a folder"], []),
    ("ablation-file-inline-base", {"abl.yaml": "name: abl\nbase: {model: {n_layers: 2}}\nvariants: {ar: {}}\n"},
     ["train", "abl.yaml"], {}, ["abl.yaml: ", "ablation file", "workbench ablate abl.yaml"], ["TypeError"]),
    ("ablation-file-path-base",
     {"abl.yaml": "name: abl\nbase: tiny.yaml\nvariants: {ar: {}, mdm: {objective.name: mdm}}\n"},
     ["train", "abl.yaml"], {}, ["abl.yaml: ", "ablation file", "workbench ablate abl.yaml"], []),
    ("ablation-file-scales-only", {"abl.yaml": TINY_BASE + "scales: {cpu: {overrides: {seed: 1}}}\n"},
     ["train", "abl.yaml"], {}, ["abl.yaml: scales: ", "ablation file", "workbench ablate abl.yaml"], []),
    ("study-file", {"study.yaml": "name: s\nrun: {base: tiny.yaml}\n"
                                  "search_space: {optimizer.lr: {low: 1e-4, high: 1e-2}}\n"
                                  "objective: {metric: val/ar_nll}\nn_trials: 2\n"},
     ["train", "study.yaml"], {}, ["study.yaml: ", "study file", "workbench tune study.yaml"], []),
    ("results-folder-is-a-file", {"run.yaml": TINY_BASE, "results-file": "I am a file\n"}, ["train", "run.yaml"],
     {"WORKBENCH_RESULTS": "{dir}/results-file"},
     ["results folder ", "results-file", "regular file", "WORKBENCH_RESULTS"], ["NotADirectoryError"]),
    ("run-dir-below-a-file", {"run.yaml": TINY_BASE, "results-file": "I am a file\n"},
     ["train", "run.yaml", "--run-dir", "{dir}/results-file/run"], {},
     ["results-file", "regular file", "--run-dir"], []),
]

OTHER_COMMANDS = [  # the same YAML reader under the ablation and study loaders
    ("ablation-duplicate-variant",
     {"abl.yaml": "name: dup\nbase: tiny.yaml\nvariants:\n  ar: {}\n  ar: {optimizer.lr: 0.001}\n"},
     ["ablate", "abl.yaml", "--dry-run"], {}, ["abl.yaml: variants.ar: ", "duplicate key", "line 5", "line 4"], []),
    ("ablation-empty", {"abl.yaml": "# to do\n"}, ["ablate", "abl.yaml", "--dry-run"], {}, ["abl.yaml: ", "empty"], []),
    ("ablation-not-utf8", {"abl.yaml": b"name: \xff\xfe\n"}, ["ablate", "abl.yaml", "--dry-run"], {},
     ["abl.yaml: ", "not UTF-8"], []),
    ("ablation-base-cycle", {"abl.yaml": "name: c\nbase: a.yaml\nvariants: {ar: {}}\n", "a.yaml": "base: a.yaml\n"},
     ["ablate", "abl.yaml", "--dry-run"], {}, ["a.yaml: base: ", "cycle"], []),
    ("study-duplicate-param", {"study.yaml": "name: s\nrun: {base: tiny.yaml}\nsearch_space:\n"
                               "  optimizer.lr: {low: 1e-4, high: 1e-2}\n  optimizer.lr: {low: 1e-3, high: 1e-2}\n"
                               "objective: {metric: val/ar_nll}\nn_trials: 2\n"},
     ["tune", "study.yaml", "--summary"], {},
     ["study.yaml: search_space.optimizer.lr: ", "duplicate key", "line 5"], []),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder below ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    """A folder with tiny.yaml, an earlier completed run under results/, and an empty environment for the CLI."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "name": "errcase"}))
    earlier = tmp_path / "results" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "summary.json").write_text('{"status": "complete"}\n')
    (earlier / "metrics.parquet").write_bytes(os.urandom(256))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("WORKBENCH_PREPARED", str(tmp_path / "prepared"))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _run_case(case_dir: Path, monkeypatch, capsys, files, argv, env) -> tuple[int, str, str]:
    for name, content in files.items():
        path = case_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(dir=case_dir))
    before = _snapshot(case_dir)
    try:
        code = main([a.format(dir=case_dir) for a in argv])
    except BaseException as err:  # what a user would see as a traceback
        pytest.fail(f"uncaught {type(err).__name__}: {err}")
    out, err = capsys.readouterr()
    assert _snapshot(case_dir) == before, "files were written or changed"
    assert not (case_dir / "prepared").exists(), "data preparation started"
    return code, out, err


def _assert_one_line(code: int, out: str, err: str, expected: list[str], forbidden: list[str]) -> None:
    assert code == 2, (code, out, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for part in expected:
        assert part in lines[0], (part, lines[0])
    for part in forbidden:
        assert part not in lines[0], (part, lines[0])


@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
@pytest.mark.parametrize("name,files,argv,env,expected,forbidden", CASES, ids=[c[0] for c in CASES])
def test_train_refuses_with_one_line(case_dir, monkeypatch, capsys, check, name, files, argv, env, expected,
                                     forbidden):
    argv = [*argv, "--check"] if check else argv
    code, out, err = _run_case(case_dir, monkeypatch, capsys, files, argv, env)
    _assert_one_line(code, out, err, expected, forbidden)


@pytest.mark.parametrize("name,files,argv,env,expected,forbidden", OTHER_COMMANDS, ids=[c[0] for c in OTHER_COMMANDS])
def test_ablation_and_study_files_go_through_the_same_reader(case_dir, monkeypatch, capsys, name, files, argv, env,
                                                            expected, forbidden):
    code, out, err = _run_case(case_dir, monkeypatch, capsys, files, argv, env)
    _assert_one_line(code, out, err, expected, forbidden)


@pytest.mark.parametrize("rank", ["1", "2"])
def test_other_ranks_exit_quietly_with_the_same_code(case_dir, monkeypatch, capsys, rank):
    import workbench.cli

    monkeypatch.setattr(workbench.cli, "QUIET_RANK_WAIT_S", 0.0)
    code, out, err = _run_case(case_dir, monkeypatch, capsys, {"run.yaml": TINY_BASE}, ["train", "run.yaml"],
                               {"WORLD_SIZE": "3", "RANK": rank})
    assert (code, out, err) == (2, "", "")


@pytest.fixture
def unwritable_results(case_dir):
    """results/ made unwritable: chmod for ordinary users; root ignores modes, so an immutable flag there."""
    results = case_dir / "results"
    results.chmod(0o555)
    immutable = False
    if os.access(results, os.W_OK):  # root
        immutable = subprocess.run(["chattr", "+i", str(results)], capture_output=True).returncode == 0
    try:
        probe = results / "probe"
        try:
            probe.mkdir()
        except OSError:
            pass
        else:
            probe.rmdir()
            pytest.skip("cannot make a folder unwritable here (root without chattr)")
        yield results
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(results)], check=True)
        results.chmod(0o755)


@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
def test_unwritable_results_folder(unwritable_results, monkeypatch, capsys, check):
    argv = ["train", "run.yaml", *(["--check"] if check else [])]
    code, out, err = _run_case(unwritable_results.parent, monkeypatch, capsys, {"run.yaml": TINY_BASE}, argv, {})
    _assert_one_line(code, out, err, [f"results folder {unwritable_results}", "not writable", "WORKBENCH_RESULTS"],
                     ["PermissionError"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_indivisible_batch_under_composers_launcher_is_reported_once_before_prep(tmp_path):
    """Two real ranks through ``python -m composer.cli -n 2``: rank 0's one line, once, no traceback, the
    launcher's exit code 2 (rank 1 waits to be stopped instead of racing rank 0 to the exit), nothing prepared."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "name": "ranks"}))
    (tmp_path / "run.yaml").write_text(TINY_BASE + "data: {batch_size: 15}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
           "WORKBENCH_PREPARED": str(tmp_path / "prepared"), "WORKBENCH_RESULTS": str(tmp_path / "results")}
    result = subprocess.run(
        [sys.executable, "-m", "composer.cli", "-n", "2", "--master_port", str(_free_port()), "-m", "workbench.cli",
         "train", "run.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    line = "error: run.yaml: data.batch_size: 15 is not divisible by the 2 processes"
    assert output.count(line) == 1 and output.count("data.batch_size") == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "results").exists()


def test_prep_takes_its_flags_literally(case_dir, monkeypatch, capsys):
    """``workbench prep RUN.yaml --text-column yes --train-split 2020`` used to re-parse the flags as YAML
    (``yes`` -> true, ``2020`` -> an integer) and refuse them as "expected a string"."""
    import datasets_prep.corpus as corpus

    seen = {}

    def fake_prepare(data, out=None, force=False, log=print):
        seen["data"] = data
        raise corpus.CorpusError("stopped before any work")

    monkeypatch.setattr(corpus, "prepare", fake_prepare)
    code = main(["prep", "tiny.yaml", "--text-column", "yes", "--train-split", "2020", "--seq-len", "32",
                 "-o", "data.val_tokens=4096"])
    assert (code, capsys.readouterr().err) == (2, "error: stopped before any work\n")
    data = seen["data"]
    assert (data.text_column, data.train_split, data.seq_len, data.val_tokens) == ("yes", "2020", 32, 4096)
    assert data.unique_tokens == TINY["data"]["unique_tokens"]  # the rest from the file
