"""Regularizers and objectives as Composer algorithms. Each module holds a pure functional form (tested on its
own) and a thin Algorithm that says when to apply it."""

from workbench.algorithms.dropout import Dropout, apply_dropout
from workbench.algorithms.objectives import DualObjectiveMixing, MaskedDiffusion, PrefixLM, install_objective
from workbench.algorithms.token_masking import TokenMasking, apply_token_masking
from workbench.algorithms.weight_decay import WeightDecay, apply_weight_decay

__all__ = [
    "Dropout", "DualObjectiveMixing", "MaskedDiffusion", "PrefixLM", "TokenMasking", "WeightDecay", "apply_dropout",
    "apply_token_masking", "apply_weight_decay", "install_objective",
]
