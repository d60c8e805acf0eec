"""MLP, attention, residual and embedding dropout, switched on by setting the model's dropout sites.

Sites (see workbench.model): MLP ``hidden`` = after the nonlinearity, before the down projection;
MLP ``output`` = on the MLP's output before the residual add; ``attention`` = on the attention
probabilities; ``residual`` = on the attention block's output; ``embedding`` = on the input embeddings.
All are inactive in eval mode. "What Makes Diffusion Language Models Super Data Learners?" reports that MLP
dropout gives AR models much of MDMs' resistance to repetition.
"""

from __future__ import annotations

from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from workbench.config import DropoutConfig
from workbench.model import MLP, Attention, Transformer


def apply_dropout(net: Transformer, mlp: float = 0.0, mlp_site: str = "hidden", attention: float = 0.0,
                  residual: float = 0.0, embedding: float = 0.0) -> Transformer:
    """Set the dropout probabilities of every block in place; returns ``net``."""
    if mlp_site not in ("hidden", "output"):
        raise ValueError(f"unknown MLP dropout site {mlp_site!r}; allowed: hidden, output")
    net.embed_dropout.p = embedding
    for module in net.modules():
        if isinstance(module, MLP):
            module.hidden_dropout.p = mlp if mlp_site == "hidden" else 0.0
            module.output_dropout.p = mlp if mlp_site == "output" else 0.0
        elif isinstance(module, Attention):
            module.attn_dropout.p = attention
            module.resid_dropout.p = residual
    return net


def dropout_rates(net: nn.Module) -> dict[str, float]:
    """Name -> p of every dropout site with p > 0 (for run metadata and tests)."""
    return {name: module.p for name, module in net.named_modules() if isinstance(module, nn.Dropout) and module.p}


class Dropout(Algorithm):
    """Model surgery at Event.INIT; the model code does not change."""

    def __init__(self, cfg: DropoutConfig):
        self.cfg = cfg

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        cfg = self.cfg
        apply_dropout(state.model.net, cfg.mlp, cfg.mlp_site, cfg.attention, cfg.residual, cfg.embedding)
