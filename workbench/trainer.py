"""Composer's Trainer without its per-step device-to-host reads.

Composer 0.32.1 reads back to the host in every training step: the optimizer closure returns ``loss.item()``,
the batch size is all-reduced as a device tensor and read with ``.item()`` before the forward pass, the loop reads
``loss.cpu().item()`` for logging, and the sample/token counts and the batch time make a device round trip
(``_accumulate_time_across_ranks``). On a GPU each read blocks the host until the queued kernels have run, so
the host can never prepare the next step while the device computes the current one; Composer's data iterator
adds one more read per batch.

:class:`WorkbenchTrainer` overrides four methods and forks nothing else:

* ``_use_closures`` is False, so the optimizer steps without the closure's ``.item()`` (the path Composer takes for
  fp16 anyway; AdamW needs no closure);
* ``_train_microbatches`` counts the batch on the host (all ranks' counts through a CPU gloo group when
  distributed) instead of a device all-reduce plus ``.item()``; the rest is Composer's code for the
  configurations the workbench uses (fixed microbatch size, no closures);
* ``_train_batch`` keeps the per-step losses on the device (all-reduced there, no other operation per step) and
  reads them once per ``log_interval`` batches; it divides them by the world size and sums them in Python, the
  same IEEE operations Composer does per step, and logs the interval's mean under Composer's keys
  (``loss/train/total``...). The tidy rows of :class:`workbench.callbacks.TidyMetricsLogger` are therefore
  bit-identical to Composer's;
* ``_accumulate_time_across_ranks`` keeps counts and batch time on the host;
* ``_iter_dataloader`` agrees on the end of the data over ranks on the host (Composer all-reduces a device flag
  and reads it with ``.item()`` before every batch).

Every checkpoint carries the losses of the log interval in progress (:class:`PendingLosses`, a callback the trainer
adds), so a run resumed inside a log interval logs that interval's row as the uninterrupted run does.

tests/test_host_sync.py counts the transfers of a CPU run and pins the Composer source these overrides mirror.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from composer import Trainer
from composer.core import Batch, Callback, Event, TrainerMode
from composer.utils import dist, ensure_tuple

from workbench.engine import make_lean


class WorkbenchTrainer(Trainer):
    """A Composer Trainer whose training loop reads nothing from the device between log intervals.

    ``log_interval``: batches between loss read-outs (the tidy logger's interval: its rows fall on the same
    batches)."""

    def __init__(self, *args: Any, log_interval: int, **kwargs: Any) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        self._loss_log_interval = log_interval
        self._step_losses: dict[str, list[torch.Tensor]] = {}  # each step's losses, on the device
        self._loss_batches = 0
        self._host_group: Any = None
        kwargs["callbacks"] = [*ensure_tuple(kwargs.get("callbacks")), PendingLosses(self)]
        super().__init__(*args, **kwargs)
        make_lean(self.engine)  # after __init__: INIT and the checkpoint load ran through Composer's own dispatch

    # the optimizer step ------------------------------------------------------------------------------------------
    def _use_closures(self) -> bool:
        """No closure: Composer's closure returns ``loss.item()``, a device sync in every step."""
        return False

    # losses --------------------------------------------------------------------------------------------------------
    def _train_batch(self, use_grad_scaling: bool) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Composer's batch, with the loss kept on the device; returns None so the loop skips its per-step
        ``loss.cpu().item()`` (the case Composer already handles for a skipped grad-scaler step)."""
        total_loss_dict = super()._train_batch(use_grad_scaling)
        for key, loss in total_loss_dict.items():
            dist.all_reduce(loss)  # as Composer's loop does (an asynchronous collective on NCCL)
            self._step_losses.setdefault(key, []).append(loss.detach())
        self._loss_batches += 1
        if (int(self.state.timestamp.batch) + 1) % self._loss_log_interval == 0:  # the counter moves on after this
            self._log_losses()
        return None  # type: ignore[return-value]

    def _log_losses(self) -> None:
        """One read of the interval's summed losses; their mean is logged under Composer's keys, so a logger that
        averages what it receives over the interval gets exactly the mean of Composer's per-step floats."""
        keys = list(self._step_losses)
        values = torch.stack([loss.reshape(()) for key in keys for loss in self._step_losses[key]]).tolist()
        world, means, start = dist.get_world_size(), {}, 0  # the one device read per interval is just above
        for key in keys:
            stop = start + len(self._step_losses[key])
            # Composer's per-step float, loss.cpu().item() / world, summed in step order (Python floats: float64)
            means[key] = sum(value / world for value in values[start:stop]) / self._loss_batches
            start = stop
        self._step_losses, self._loss_batches = {}, 0
        self.state.total_loss_dict = means
        self.logger.log_metrics(means)

    # the batch size and the time counters, on the host -----------------------------------------------------------
    def _host_sum(self, values: Sequence[float]) -> list[float]:
        """Sums over ranks without touching the device: a CPU gloo group beside the training backend."""
        if dist.get_world_size() == 1:
            return list(values)
        if self._host_group is None:  # every rank reaches the first call at the same point of the loop
            default_gloo = torch.distributed.get_backend() == "gloo"
            self._host_group = torch.distributed.GroupMember.WORLD if default_gloo else \
                torch.distributed.new_group(backend="gloo")
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor, group=self._host_group)
        return tensor.tolist()

    def _train_microbatches(self, microbatches: Sequence[Any], total_loss_dict: dict[str, torch.Tensor],
                            ddp_sync: bool = True) -> torch.Tensor:
        """Composer 0.32.1's ``Trainer._train_microbatches`` for ``ddp_sync=True`` (always, without closures), with
        the global batch size counted on the host."""
        assert ddp_sync and self._train_data_spec is not None and self.state.scaler is not None
        self.engine.run_event(Event.BEFORE_TRAIN_BATCH)
        use_grad_scaling = self._use_grad_scaling(self.state.precision, self.state.scaler)
        for optimizer in self.state.optimizers:
            try:
                optimizer.zero_grad(set_to_none=True)
            except TypeError:
                optimizer.zero_grad()
        spec = self._train_data_spec
        if self.accumulate_train_batch_on_tokens:
            local = sum(spec.get_num_tokens_in_batch(b, token_type="loss_generating") for b in microbatches)
        else:
            local = sum(spec.get_num_samples_in_batch(b) for b in microbatches)
        current_batch_size = self._host_sum([local])[0] / dist.get_world_size()

        current_batch = self.state.batch
        for microbatch_idx, self.state.batch in enumerate(microbatches):
            self.state.batch = self.state.device.batch_to_device(self.state.batch)
            self.state.batch = spec.microbatch_transforms(self.state.batch)
            is_final_microbatch = microbatch_idx + 1 == len(microbatches)
            microbatch_loss_dict = self._train_microbatch(use_grad_scaling, current_batch_size,
                                                          is_final_microbatch)
            for k, microbatch_loss in microbatch_loss_dict.items():
                loss_key = f"loss/train/{k}"
                if loss_key not in total_loss_dict:
                    total_loss_dict[loss_key] = self.state.device.tensor_to_device(torch.zeros(size=(1,)))
                total_loss_dict[loss_key] += microbatch_loss
        self.state.batch = current_batch

        if use_grad_scaling:
            for optimizer in self.state.optimizers:
                self.state.scaler.unscale_(optimizer)
        self.engine.run_event(Event.AFTER_TRAIN_BATCH)
        return total_loss_dict["loss/train/total"]

    def _accumulate_time_across_ranks(self, num_samples: int | float, num_tokens: int,
                                      batch_time: datetime.timedelta) -> tuple[int, int, datetime.timedelta]:
        """Samples and tokens summed over ranks on the host; the batch time is rank 0's (Composer broadcasts it
        through the device)."""
        if dist.get_world_size() == 1:
            samples, tokens = num_samples, num_tokens
        else:
            samples, tokens, rank0_seconds = self._host_sum(
                [num_samples, num_tokens, batch_time.total_seconds() if dist.get_global_rank() == 0 else 0.0])
            batch_time = datetime.timedelta(seconds=rank0_seconds)
        if isinstance(samples, float) and abs(round(samples) - samples) > 1e-4:
            raise ValueError("The sums of samples and tokens across ranks should each be integers.")
        return round(samples), round(tokens), batch_time

    def _iter_dataloader(self, trainer_mode: TrainerMode) -> Iterator[Batch]:
        """Composer 0.32.1's ``Trainer._iter_dataloader`` (at most ``dataloader_len`` batches; all ranks stop when one
        runs out) with the finished flag reduced on the host."""
        assert self.state.dataloader is not None, "the dataloader should be set before calling this method"
        if self.state.dataloader_len is None:
            dataloader_iter = iter(self.state.dataloader)
        else:
            dataloader_iter = itertools.islice(self.state.dataloader, int(self.state.dataloader_len))
        while True:
            finished = 0.0
            try:
                if trainer_mode == TrainerMode.TRAIN:
                    self.engine.run_event(Event.BEFORE_DATALOADER)
                batch = next(dataloader_iter)
            except StopIteration:
                if trainer_mode == TrainerMode.TRAIN:  # closes the dataloader marker the train loop would close
                    self.engine.run_marker_only_event(Event.AFTER_DATALOADER)
                finished = 1.0
            if self._host_sum([finished])[0] > 0:  # any rank finished: all stop
                break
            yield batch


class PendingLosses(Callback):
    """The training losses of the log interval in progress, carried by every checkpoint.

    A checkpoint can fall inside a log interval (an epoch's or a token count's last batch rarely ends one); without
    these, the resumed run's first train-loss row would average only the steps after the checkpoint and differ
    from the uninterrupted run's. The tensors travel in the checkpoint like the model's (no read of our own)."""

    def __init__(self, trainer: WorkbenchTrainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"losses": {key: list(losses) for key, losses in self.trainer._step_losses.items()},
                "batches": self.trainer._loss_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.trainer.state.device
        self.trainer._step_losses = {key: [device.tensor_to_device(loss) for loss in losses]
                                     for key, losses in state["losses"].items()}
        self.trainer._loss_batches = int(state["batches"])
