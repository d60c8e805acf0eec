"""prepare() from many processes at once: one preparation, published atomically, byte-identical to a lone one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from datasets_prep.corpus import prepare
from workbench.config import DataConfig, TokenizerConfig
from workbench.paths import REPO_ROOT, data_dir

BPE = TokenizerConfig(kind="bpe", vocab_size=512, train_documents=40)
WORKER = """
import sys, time, pathlib
import datasets  # imported before the start signal, so the processes race in prepare() itself
from datasets_prep.corpus import prepare
from workbench.config import DataConfig, TokenizerConfig
corpus, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
cfg = DataConfig(corpus=corpus, tokenizer=TokenizerConfig(kind="bpe", vocab_size=512, train_documents=40),
                 unique_tokens=8192, val_tokens=2048, seq_len=64)
ready.touch()
while not go.exists():
    time.sleep(0.005)
prepare(cfg, log=lambda message: print(message, flush=True))
"""


def small_corpus(root: Path) -> Path:
    """80 real Wikipedia articles as parquet: 60 train, 20 validation (seconds to prepare)."""
    frame = pl.read_parquet(data_dir() / "wikipedia-en" / "validation" / "part-0000.parquet", n_rows=80)
    for split, rows in (("train", frame[:60]), ("validation", frame[60:])):
        (root / split).mkdir(parents=True)
        rows.write_parquet(root / split / "part-0000.parquet")
    return root


def cache_files(root: Path) -> dict[str, bytes]:
    """Every published file of a prepared cache (shards, manifests, tokenizers), by relative path; lock files
    and the hash / Hugging Face caches are bookkeeping, not outputs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") or part in ("hf-datasets", "hashes")
                                       for part in p.relative_to(root).parts)}


@pytest.mark.slow
def test_three_processes_prepare_once_and_match_a_single_preparation(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path / "corpus")
    race = tmp_path / "race"
    env = {**os.environ, "WORKBENCH_PREPARED": str(race), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(corpus), str(tmp_path / f"ready{i}"), str(go)],
                              env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker failed to start"
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
    logs = "\n".join(outputs)

    monkeypatch.setenv("WORKBENCH_PREPARED", str(tmp_path / "single"))
    cfg = DataConfig(corpus=str(corpus), tokenizer=BPE, unique_tokens=8192, val_tokens=2048, seq_len=64)
    single = prepare(cfg, log=lambda _: None)

    raced, alone = cache_files(race), cache_files(tmp_path / "single")
    assert sorted(raced) == sorted(alone)  # one set of shards: no second copy, no leftover temporary folder
    assert raced == alone  # byte-identical
    assert {Path(name).parent.name for name in raced if name.endswith("manifest.json")} == {
        single.train.path.name, single.val.path.name}
    assert not [p for p in race.rglob("*.tmp*")]
    for output in ("train: wrote", "val: wrote", "tokenizer: wrote"):  # each output prepared by one process
        assert logs.count(output) == 1, logs
    assert logs.count("train: already prepared") == 2 and logs.count("val: already prepared") == 2


HOLDER = """
import sys, time, pathlib
from datasets_prep.cache import exclusive
with exclusive(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_killed_writer_blocks_no_one_and_its_leftovers_are_removed(tmp_path, monkeypatch):
    """The lock dies with its holder (SIGKILL included); the half-written folder it leaves is cleaned up."""
    from filelock import FileLock, Timeout

    monkeypatch.setenv("WORKBENCH_PREPARED", str(tmp_path / "prepared"))
    corpus = small_corpus(tmp_path / "corpus")
    cfg = DataConfig(corpus=str(corpus), tokenizer=BPE, unique_tokens=4096, val_tokens=1024, seq_len=64)
    target = prepare(cfg, log=lambda _: None).train.path
    reference = cache_files(target)

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Timeout):
        FileLock(str(target.with_name(f".{target.name}.lock"))).acquire(timeout=0.2)
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait(timeout=30)

    shutil.rmtree(target)  # as if the killed process had been the first writer, mid-way
    stale = target.with_name(f".{target.name}.tmp-killed")
    stale.mkdir()
    (stale / "shard.00000.mds").write_bytes(b"half")
    messages: list[str] = []
    again = prepare(cfg, log=messages.append)
    assert again.train.path == target and cache_files(target) == reference
    assert not stale.exists() and not any("waiting" in m for m in messages)
