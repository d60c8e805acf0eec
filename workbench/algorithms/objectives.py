"""Objective algorithms: each claims the model's loss at Event.INIT (the loss formulas live in
workbench.objectives and workbench.diffusion); the dual objective also decides, per batch, which objective a
step or which sequences use. A model holds exactly one objective: a second claim is an error."""

from __future__ import annotations

import math

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from workbench.config import DiffusionConfig, DualConfig, PrefixLMConfig
from workbench.objectives import ARObjective, DualObjective, MDMObjective, PrefixLMObjective


def install_objective(model, objective) -> None:
    """Give ``model`` its training objective; refuse a second non-AR objective."""
    current = getattr(model, "objective", None)
    if current is not None and not isinstance(current, ARObjective):
        raise ValueError(f"the model's loss is already claimed by the {current.name!r} objective; "
                         f"a run has exactly one objective (got {objective.name!r} too)")
    model.objective = objective


class _ObjectiveAlgorithm(Algorithm):
    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        install_objective(state.model, self.objective)


class MaskedDiffusion(_ObjectiveAlgorithm):
    """Train with the masked-diffusion (MDLM) objective, bidirectional attention."""

    def __init__(self, cfg: DiffusionConfig, mask_id: int, z_loss: float = 0.0):
        self.objective = MDMObjective(cfg, mask_id, z_loss)


class PrefixLM(_ObjectiveAlgorithm):
    """Train AR on the continuation of a bidirectionally attended random-length prefix."""

    def __init__(self, cfg: PrefixLMConfig, z_loss: float = 0.0):
        self.objective = PrefixLMObjective(cfg, z_loss)


def ar_fraction_at(cfg: DualConfig, progress: float) -> float:
    """The AR fraction at a point of training: constant, or linear from ar_fraction to ar_fraction_end."""
    if cfg.ar_fraction_end is None:
        return cfg.ar_fraction
    progress = min(max(progress, 0.0), 1.0)
    return cfg.ar_fraction + (cfg.ar_fraction_end - cfg.ar_fraction) * progress


def is_ar_step(step: int, fraction: float) -> bool:
    """Deterministic interleaving: step s is AR when floor((s+1) a) > floor(s a), so exactly a fraction a of
    any run of steps is AR, evenly spread (a = 0.25: steps 3, 7, 11, ...). No RNG, so resume-safe."""
    return math.floor((step + 1) * fraction + 1e-9) > math.floor(step * fraction + 1e-9)


class DualObjectiveMixing(_ObjectiveAlgorithm):
    """AR + MDM mixing (Dual Language Models): installs the mixture objective and marks each batch."""

    def __init__(self, diffusion: DiffusionConfig, dual: DualConfig, mask_id: int, z_loss: float = 0.0):
        self.cfg = dual
        self.objective = DualObjective(diffusion, dual, mask_id, z_loss)

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_DATALOADER)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            return super().apply(event, state, logger)
        elapsed = state.get_elapsed_duration()
        fraction = ar_fraction_at(self.cfg, float(elapsed) if elapsed is not None else 0.0)
        if self.cfg.mode == "steps":
            state.batch["objective"] = "ar" if is_ar_step(int(state.timestamp.batch), fraction) else "mdm"
        else:
            state.batch["ar_fraction"] = fraction
