"""The training loop reads nothing from the device between log intervals (workbench.trainer), and the training-loss
rows it writes are bit-identical to Composer's own loop.

On a GPU every ``.item()`` / ``.cpu()`` / ``.tolist()`` of a device tensor blocks the host until the queued kernels
have run. A CPU run cannot see the waiting, but it can count the calls: the tensor methods are patched and every
call made by framework code (Composer, Streaming, the workbench; not torch's own internals, e.g. AdamW's
host-resident step counters) is attributed to the training step in progress."""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections import Counter
from pathlib import Path

import composer
import polars as pl
import pytest
import torch
from composer import Trainer
from composer.core import Callback

import workbench.trainer
from workbench.results import read_metrics
from workbench.train import train

TORCH_DIR = str(Path(torch.__file__).parent)
READS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")


class TransferCounter(Callback):
    """Counts host reads of tensors made by framework code from the first batch until FIT_END, keyed by the training
    step in progress (completed batches + 1)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.state = None
        self.active = False
        self.calls: Counter[tuple[int, str, str]] = Counter()
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name: str, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                caller = sys._getframe(1).f_code.co_filename
                if not caller.startswith(TORCH_DIR):
                    where = f"{Path(caller).name}:{sys._getframe(1).f_lineno}"
                    self.calls[(int(self.state.timestamp.batch) + 1, name, where)] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def batch_start(self, state, logger) -> None:
        self.state, self.active = state, True

    def fit_end(self, state, logger) -> None:
        self.active = False


def _config(tiny_config, name: str, overrides: dict | None = None):
    return tiny_config({"name": name, "trainer": {"max_duration": "10ba", "log_interval": 4},
                        "eval": {"interval": "1000ba"}, **(overrides or {})})


def test_no_device_reads_between_log_intervals(tiny_config, monkeypatch):
    counter = TransferCounter(monkeypatch)
    train(_config(tiny_config, "host-sync-count"), extra_callbacks=[counter])
    steps = {step for step, _, _ in counter.calls}
    between = {key: n for key, n in counter.calls.items() if key[0] % 4}
    assert not between, f"device reads inside steps that log nothing: {between}"
    assert steps == {4, 8}  # one read of the summed losses at each log interval (the counter itself works)


class ComposerTrainer(Trainer):
    """Composer's own loop, as the workbench ran before workbench.trainer (the reference for the loss rows)."""

    def __init__(self, *args, log_interval: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)


def _train_rows(run_dir) -> pl.DataFrame:
    frame = read_metrics(run_dir / "metrics.parquet")
    return frame.filter((pl.col("split") == "train") & (pl.col("metric") == "loss")).select(
        ["step", "tokens_seen", "value"]).sort("step")


@pytest.mark.parametrize("overrides", [
    {"trainer": {"microbatch_size": 8}},  # two microbatches per step: the summed loss
    {"objective": {"name": "dual", "dual": {"ar_fraction": 0.5, "mode": "sequences"}},
     "algorithms": {"dropout": {"mlp": 0.1}}},
], ids=["ar-microbatches", "dual-dropout"])
def test_training_loss_rows_are_identical_to_composers_loop(tiny_config, results_root, monkeypatch, overrides):
    name = "loss-rows-" + ("ar" if "objective" not in overrides else "dual")
    base = {"trainer": {"max_duration": "14ba", "log_interval": 3, **overrides.get("trainer", {})},
            **{k: v for k, v in overrides.items() if k != "trainer"}}
    train(tiny_config({**base, "name": name}))
    with monkeypatch.context() as patch:
        patch.setattr(workbench.trainer, "WorkbenchTrainer", ComposerTrainer)
        train(tiny_config({**base, "name": name + "-composer"}))
    ours, composers = _train_rows(results_root / name), _train_rows(results_root / (name + "-composer"))
    assert ours["step"].to_list() == [3, 6, 9, 12]
    assert ours.equals(composers), f"{ours}\n{composers}"


# The overridden methods mirror Composer 0.32.1's code: an upgrade must re-read them (workbench/trainer.py).
MIRRORED = {
    "_train_loop": "1dffbf6b9c51bcaa",
    "_train_batch": "787aff3a7f538299",
    "_train_microbatches": "3ee43a3fb726d98f",
    "_accumulate_time_across_ranks": "a7a8ddb3e21b06c7",
    "_iter_dataloader": "970ae649c7dcbe0a",
}


def test_composer_methods_mirrored_by_the_workbench_trainer_are_unchanged():
    assert composer.__version__ == "0.32.1"
    digests = {name: hashlib.sha256(inspect.getsource(getattr(Trainer, name)).encode()).hexdigest()[:16]
               for name in MIRRORED}
    assert digests == MIRRORED, "Composer changed the methods workbench.trainer.WorkbenchTrainer overrides: " \
                                "re-read them and update workbench/trainer.py, then these digests"
