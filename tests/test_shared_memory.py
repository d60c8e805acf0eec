"""A finished run gives back Streaming's shared memory: a process that trains many runs in turn (a tune worker,
the test suite) must not keep every run's segments open until it exits (the suite once hit the open-file limit)."""

from __future__ import annotations

import os

from workbench.data import TokenShards
from workbench.train import train


def _shm_descriptors(names: set[str]) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith("/dev/shm/") and target.split("/")[-1] in names
    return count


def test_train_closes_its_datasets_shared_memory(tiny_config, results_root):
    before = set(TokenShards.live)
    train(tiny_config({"name": "shm-release", "trainer": {"max_duration": "1ep"}}), results_root / "shm-release")
    datasets = [d for d in TokenShards.live if d not in before]
    assert datasets, "the run built no TokenShards"
    names = {f"{d._shm_prefix_int:06}_{suffix}" for d in datasets
             for suffix in ("locals", "barrier", "shard_states", "shard_access_times")}
    # before the fix: each of these segments stayed open (several descriptors each) until the process exited
    assert _shm_descriptors(names) == 0
