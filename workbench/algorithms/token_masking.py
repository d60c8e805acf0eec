"""Input-token masking (token dropout) for AR training: inputs are corrupted, targets stay the original tokens.

"What Makes Diffusion Language Models Super Data Learners?" finds that this random input corruption, not the
diffusion objective itself, is the main source of MDMs' data efficiency, and that it helps AR models too.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from workbench.config import TokenMaskingConfig
from workbench.diffusion import sample_times


def masking_rates(cfg: TokenMaskingConfig, batch_size: int, device) -> torch.Tensor:
    """Per-sequence masking rate: fixed p, r ~ U(0, max_rate), or r from a diffusion time sampler."""
    if cfg.rate is not None:
        return torch.full((batch_size,), cfg.rate, device=device)
    if cfg.max_rate is not None:
        return cfg.max_rate * torch.rand(batch_size, device=device)
    assert cfg.time_sampler is not None
    return sample_times(cfg.time_sampler, batch_size, 0.0, device)[0]


def apply_token_masking(tokens: torch.Tensor, rate: torch.Tensor, mask_id: int, vocab_size: int,
                        replacement: str = "mask", protected_ids: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Corrupt each input position with probability ``rate`` (per sequence, shape (B,)).

    Returns the batch keys the AR objective reads: ``inputs`` (mask id or a random real token at corrupted
    positions) or, for ``zero``, unchanged inputs plus ``zero_embed`` (those positions' embeddings are zeroed,
    without a 1/(1-p) rescale). Tokens in ``protected_ids`` (e.g. EOS) are never corrupted."""
    corrupt = torch.rand(tokens.shape, device=tokens.device) < rate[:, None]
    if protected_ids:
        corrupt &= ~torch.isin(tokens, torch.tensor(protected_ids, device=tokens.device))
    if replacement == "mask":
        return {"inputs": tokens.masked_fill(corrupt, mask_id)}
    if replacement == "random":  # uniform over real tokens except the mask token
        random = torch.randint(0, vocab_size - 1, tokens.shape, device=tokens.device)
        random = random + (random >= mask_id).long()
        return {"inputs": torch.where(corrupt, random, tokens)}
    if replacement == "zero":
        return {"inputs": tokens, "zero_embed": corrupt}
    raise ValueError(f"unknown replacement {replacement!r}; allowed: mask, zero, random")


class TokenMasking(Algorithm):
    """Corrupts each training batch's inputs after it leaves the dataloader (never evaluation batches)."""

    def __init__(self, cfg: TokenMaskingConfig, mask_id: int, eos_id: int, vocab_size: int):
        self.cfg, self.mask_id, self.vocab_size = cfg, mask_id, vocab_size
        self.protected = () if cfg.mask_special else (eos_id,)

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        tokens = state.batch["tokens"]
        rate = masking_rates(self.cfg, tokens.shape[0], tokens.device)
        state.batch.update(apply_token_masking(tokens, rate, self.mask_id, self.vocab_size, self.cfg.replacement,
                                               self.protected))
