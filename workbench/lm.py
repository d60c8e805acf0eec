"""The Composer wrapper: a transformer plus the objective it trains with, and validation metrics.

Training calls ``objective(net, batch)``; objective algorithms swap the objective at Event.INIT.
Validation computes what the run is compared on, with estimators that do not depend on the training recipe:
``ar_nll`` (per-token next-token NLL, causal attention) and ``mdm_nelbo`` (fixed stratified-t NELBO,
bidirectional attention), both in nats per token, accumulated on device (no host sync per batch).
"""

from __future__ import annotations

from typing import Any

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from workbench.diffusion import nelbo_fixed, token_nll
from workbench.metrics import TokenMean
from workbench.model import Transformer
from workbench.objectives import ARObjective


class WorkbenchLM(ComposerModel):
    def __init__(self, net: Transformer, mask_id: int, eos_id: int, vocab_size: int, shifted: bool,
                 eval_metrics: tuple[str, ...] = ("ar_nll",), nelbo_samples: int = 8, subs: bool = True,
                 nelbo_seed: int = 0):
        super().__init__()
        self.net = net
        self.mask_id, self.eos_id, self.vocab_size = mask_id, eos_id, vocab_size
        self.shifted, self.subs = shifted, subs
        self.objective: Any = ARObjective()
        self.eval_metric_names = tuple(eval_metrics)
        self.nelbo_samples, self.nelbo_seed = nelbo_samples, nelbo_seed
        self.extra_metrics: dict[str, Metric] = {}  # downstream task metrics (workbench.evaluation)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.objective(self.net, batch)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any], *args, **kwargs) -> torch.Tensor:
        return outputs["loss"]

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> dict[str, Any]:
        if "task" in batch:  # a downstream task batch
            from workbench.evaluation.scoring import score_batch

            return score_batch(self, batch)
        tokens = batch["tokens"]
        results: dict[str, Any] = {}
        if "ar_nll" in self.eval_metric_names:
            nll = token_nll(self.net(tokens, causal=True)[:, :-1], tokens[:, 1:])
            results["ar_nll"] = (nll.sum(), torch.tensor(float(nll.numel()), device=nll.device))
        if "mdm_nelbo" in self.eval_metric_names:
            per_sequence, counts = nelbo_fixed(self.net, tokens, batch["index"], self.nelbo_samples, self.mask_id,
                                               self.shifted, self.subs, seed=self.nelbo_seed)
            results["mdm_nelbo"] = (per_sequence.sum(), counts.sum())
        return results

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        metric.update(*outputs[metric.key])

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            return {}
        metrics = {name: TokenMean(name) for name in self.eval_metric_names}
        metrics.update(self.extra_metrics)
        return metrics
