"""Shared by the objective algorithms: a model holds exactly one training objective.

Each objective algorithm claims the model's loss at Event.INIT (the loss formulas themselves live in
workbench.objectives and workbench.diffusion); a second claim is an error, so two objectives can never
silently mix."""

from __future__ import annotations

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from workbench.objectives import ARObjective


def install_objective(model, objective) -> None:
    """Give ``model`` its training objective; refuse a second non-AR objective."""
    current = getattr(model, "objective", None)
    if current is not None and not isinstance(current, ARObjective):
        raise ValueError(f"the model's loss is already claimed by the {current.name!r} objective; "
                         f"a run has exactly one objective (got {objective.name!r} too)")
    model.objective = objective


class ObjectiveAlgorithm(Algorithm):
    """Installs ``self.objective`` at Event.INIT."""

    objective = None

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        install_objective(state.model, self.objective)
