"""Shared fixtures: tiny configs over a real slice of the bundled Wikipedia corpus, prepared once per session.

Every test that trains uses ``tiny_config`` (2-layer, 64-wide model, 512-token BPE, 64k unique tokens) so
the whole suite stays within minutes on a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workbench.config import RunConfig, config_from_dict, deep_merge
from workbench.paths import data_dir

TINY = {
    "name": "tiny",
    "seed": 7,
    "data": {
        "tokenizer": {"kind": "bpe", "vocab_size": 512, "train_documents": 60},
        "unique_tokens": 32768, "val_tokens": 8192, "seq_len": 64, "batch_size": 16,
    },
    "model": {"n_layers": 2, "d_model": 64, "n_heads": 2},
    "optimizer": {"lr": 0.003},
    "eval": {"batch_size": 32, "nelbo_samples": 2},
    "trainer": {"max_duration": "2ep", "progress_bar": False, "log_interval": 4, "checkpoint_interval": "1ep"},
}


@pytest.fixture(scope="session", autouse=True)
def _workbench_dirs(tmp_path_factory):
    """Prepared shards are cached for the whole session; results go to a temporary folder."""
    if not (data_dir() / "wikipedia-en").is_dir():
        pytest.exit(f"bundled data not found at {data_dir()}; set WORKBENCH_DATA", returncode=2)
    root = tmp_path_factory.mktemp("workbench")
    os.environ["WORKBENCH_PREPARED"] = os.environ.get("WORKBENCH_TEST_PREPARED", str(root / "prepared"))
    os.environ["WORKBENCH_RESULTS"] = str(root / "results")
    yield


@pytest.fixture
def results_root() -> Path:
    return Path(os.environ["WORKBENCH_RESULTS"])


def make_config(overrides: dict | None = None) -> RunConfig:
    return config_from_dict(deep_merge(TINY, overrides or {}), "test config")


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config({"objective": {"name": "mdm"}, "name": "x"})`` -> validated RunConfig."""
    return make_config


@pytest.fixture(autouse=True)
def _release_streaming_shared_memory():
    """Tests build many runs in one process; Streaming registers every shared-memory segment it opens with
    atexit, so their descriptors stay open until the process exits, which once exhausted the open-file limit
    mid-suite. Release each test's datasets, and sweep every leftover segment when descriptors pile up."""
    yield
    import gc

    from streaming.base.shared.memory import SharedMemory

    from workbench.data import TokenShards, close_segments, release_shared_memory

    release_shared_memory(list(TokenShards.live))
    if len(os.listdir("/proc/self/fd")) >= 1000:
        close_segments([obj for obj in gc.get_objects() if isinstance(obj, SharedMemory)])
