"""Masked-diffusion (MDLM) training objective with bidirectional attention.

The functional form is :func:`workbench.diffusion.mdm_loss` (time samplers, bernoulli/exact masking, elbo or
sampled weighting, SUBS, shifted or unshifted parameterisation)."""

from __future__ import annotations

from workbench.algorithms.objective import ObjectiveAlgorithm
from workbench.config import DiffusionConfig
from workbench.objectives import MDMObjective


class MaskedDiffusion(ObjectiveAlgorithm):
    def __init__(self, cfg: DiffusionConfig, mask_id: int, z_loss: float = 0.0):
        self.objective = MDMObjective(cfg, mask_id, z_loss)
