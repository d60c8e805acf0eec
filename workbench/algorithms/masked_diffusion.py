"""Masked-diffusion (MDLM) training objective with bidirectional attention.

The functional form is :func:`workbench.diffusion.mdm_loss` (time samplers, bernoulli/exact masking, elbo or
sampled weighting, SUBS, shifted or unshifted parameterisation); it takes plain arguments, which this module
unpacks from the run config's ``objective.diffusion`` section."""

from __future__ import annotations

from typing import Any

from workbench.algorithms.objective import ObjectiveAlgorithm
from workbench.config import DiffusionConfig, TimeSamplerConfig
from workbench.objectives import MDMObjective


def sampler_args(cfg: TimeSamplerConfig) -> tuple[str, dict[str, float]]:
    """A time-sampler config -> (name, parameters) for :func:`workbench.diffusion.sample_times`."""
    return cfg.name, {"a": cfg.a, "b": cfg.b, "mu": cfg.mu, "sigma": cfg.sigma}


def diffusion_kwargs(cfg: DiffusionConfig) -> dict[str, Any]:
    """The ``objective.diffusion`` section -> keyword arguments of :func:`workbench.diffusion.mdm_loss`."""
    name, params = sampler_args(cfg.time_sampler)
    return {"time_sampler": name, "sampler_params": params, "eps": cfg.eps, "weighting": cfg.weighting,
            "masking": cfg.masking, "subs": cfg.subs, "shifted": bool(cfg.shifted)}


class MaskedDiffusion(ObjectiveAlgorithm):
    def __init__(self, cfg: DiffusionConfig, mask_id: int, z_loss: float = 0.0):
        self.objective = MDMObjective(mask_id, z_loss, **diffusion_kwargs(cfg))
