"""Torchmetrics metrics shared by validation (workbench.lm) and downstream evaluation (workbench.evaluation).

They live here, below both, so that neither imports the other for a metric: ``lm`` used to define
``TokenMean`` while ``evaluation.tasks`` subclassed it and ``lm`` called into ``evaluation.scoring``, an import
cycle (lm -> evaluation.scoring -> evaluation.tasks -> lm)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class TokenMean(Metric):
    """Sum of per-token losses / number of tokens, reduced across devices.

    Both sums stay on the device in float64 (no host sync per batch; exact enough for millions of tokens)."""

    full_state_update = False

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.total += total.double()
        self.count += count.double()

    def compute(self) -> torch.Tensor:
        return self.total / self.count
