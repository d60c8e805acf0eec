"""Prefix-LM: bidirectional attention over a random-length prefix, AR loss on the tokens after it.

The functional forms are :func:`workbench.objectives.prefix_lm_mask` and :func:`prefix_lm_loss`."""

from __future__ import annotations

from workbench.algorithms.objective import ObjectiveAlgorithm
from workbench.config import PrefixLMConfig
from workbench.objectives import PrefixLMObjective


class PrefixLM(ObjectiveAlgorithm):
    def __init__(self, cfg: PrefixLMConfig, z_loss: float = 0.0):
        self.objective = PrefixLMObjective(cfg.min_prefix, cfg.max_prefix, z_loss)
