"""AR + MDM mixing ("Dual Language Models: Balancing Training Efficiency and Overfitting Resilience").

A fraction alpha of optimisation steps (or of the sequences in each batch) trains the AR objective with
causal attention, the rest the diffusion objective with bidirectional attention; alpha may follow a linear
schedule. The loss itself is :class:`workbench.objectives.DualObjective`; this module decides per batch."""

from __future__ import annotations

import math

from composer.core import Event, State
from composer.loggers import Logger

from workbench.algorithms.masked_diffusion import diffusion_kwargs
from workbench.algorithms.objective import ObjectiveAlgorithm
from workbench.config import DiffusionConfig, DualConfig
from workbench.objectives import DualObjective


def ar_fraction_at(progress: float, start: float, end: float | None = None) -> float:
    """The AR fraction at a point of training: constant ``start``, or linear from ``start`` to ``end``."""
    if end is None:
        return start
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


def is_ar_step(step: int, fraction: float) -> bool:
    """Deterministic interleaving: step s is AR when floor((s+1) a) > floor(s a), so exactly a fraction a of
    any run of steps is AR, evenly spread (a = 0.25: steps 3, 7, 11, ...). No RNG, so resume-safe."""
    return math.floor((step + 1) * fraction + 1e-9) > math.floor(step * fraction + 1e-9)


class DualObjectiveMixing(ObjectiveAlgorithm):
    """Installs the mixture objective at Event.INIT and marks each training batch after the dataloader."""

    def __init__(self, diffusion: DiffusionConfig, dual: DualConfig, mask_id: int, z_loss: float = 0.0):
        self.cfg = dual
        self.objective = DualObjective(mask_id, z_loss, mode=dual.mode, ar_fraction=dual.ar_fraction,
                                       ar_weight=dual.ar_weight, mdm_weight=dual.mdm_weight,
                                       **diffusion_kwargs(diffusion))

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_DATALOADER)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            return super().apply(event, state, logger)
        elapsed = state.get_elapsed_duration()
        fraction = ar_fraction_at(float(elapsed) if elapsed is not None else 0.0, self.cfg.ar_fraction,
                                  self.cfg.ar_fraction_end)
        if self.cfg.mode == "steps":
            state.batch["objective"] = "ar" if is_ar_step(int(state.timestamp.batch), fraction) else "mdm"
        else:
            state.batch["ar_fraction"] = fraction
