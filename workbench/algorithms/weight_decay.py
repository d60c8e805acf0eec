"""Weight decay as optimizer parameter groups: which parameters decay, by how much, on what schedule.

The optimizer section of a run stays the single place the optimizer is declared; this algorithm only
regroups its parameters (at Event.INIT, before the LR scheduler binds to the groups) and, with a schedule,
updates the decaying group's ``weight_decay`` each batch. How the value acts depends on the optimizer:
``adamw`` decays by lr * value * p per step; ``decoupled_adamw`` by value * (lr / peak lr) * p.
"""

from __future__ import annotations

import math

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from workbench.config import WeightDecayConfig
from workbench.model import Transformer


def exempt_parameters(net: Transformer, exempt: list[str]) -> set[int]:
    """ids of parameters that must not decay: norms' weights, biases, the embedding, the output head."""
    ids: set[int] = set()
    for module_name, module in net.named_modules():
        for name, param in module.named_parameters(recurse=False):
            is_norm = isinstance(module, nn.LayerNorm | nn.RMSNorm)
            if ("norm" in exempt and is_norm) or ("bias" in exempt and name == "bias") or (
                    "embedding" in exempt and module is net.embed) or ("head" in exempt and module_name == "head"):
                ids.add(id(param))
    return ids


def apply_weight_decay(optimizer: torch.optim.Optimizer, net: Transformer, value: float,
                       exempt: list[str]) -> torch.optim.Optimizer:
    """Split the optimizer's parameters into a decaying group (``value``) and an exempt group (0), in place.
    Call before any optimizer step; other hyperparameters are copied from the existing first group."""
    if optimizer.state:
        raise RuntimeError("apply_weight_decay must run before the optimizer has state (at Event.INIT)")
    template = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    skip = exempt_parameters(net, exempt)
    decay = [p for p in params if id(p) not in skip]
    no_decay = [p for p in params if id(p) in skip]
    optimizer.param_groups.clear()
    optimizer.add_param_group({**template, "params": decay, "weight_decay": value, "decay_base": value})
    if no_decay:
        optimizer.add_param_group({**template, "params": no_decay, "weight_decay": 0.0, "decay_base": 0.0})
    return optimizer


def decay_multiplier(schedule: str, progress: float, final_fraction: float) -> float:
    """1 at the start of training, ``final_fraction`` at the end (linear or cosine); constant: always 1."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 + (final_fraction - 1.0) * progress
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightDecay(Algorithm):
    def __init__(self, cfg: WeightDecayConfig):
        self.cfg = cfg

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT or (event == Event.BATCH_START and self.cfg.schedule != "constant")

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            for optimizer in state.optimizers:
                apply_weight_decay(optimizer, state.model.net, self.cfg.value, self.cfg.exempt)
            return
        elapsed = state.get_elapsed_duration()
        factor = decay_multiplier(self.cfg.schedule, float(elapsed) if elapsed is not None else 0.0,
                                  self.cfg.final_fraction)
        for optimizer in state.optimizers:
            for group in optimizer.param_groups:
                group["weight_decay"] = group.get("decay_base", 0.0) * factor
