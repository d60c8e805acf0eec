"""Regularizers and objectives as Composer algorithms. Each module holds a pure functional form (tested on its
own) and a thin Algorithm that says when to apply it."""

from workbench.algorithms.dropout import Dropout, apply_dropout
from workbench.algorithms.dual_objective import DualObjectiveMixing, ar_fraction_at, is_ar_step
from workbench.algorithms.masked_diffusion import MaskedDiffusion
from workbench.algorithms.objective import install_objective
from workbench.algorithms.prefix_lm import PrefixLM
from workbench.algorithms.token_masking import TokenMasking, apply_token_masking
from workbench.algorithms.weight_decay import WeightDecay, apply_weight_decay

__all__ = [
    "Dropout", "DualObjectiveMixing", "MaskedDiffusion", "PrefixLM", "TokenMasking", "WeightDecay", "apply_dropout",
    "apply_token_masking", "apply_weight_decay", "ar_fraction_at", "install_objective", "is_ar_step",
]
