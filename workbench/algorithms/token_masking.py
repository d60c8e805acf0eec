"""Input-token masking (token dropout) for AR training: inputs are corrupted, targets stay the original tokens.

"What Makes Diffusion Language Models Super Data Learners?" finds that this random input corruption, not the
diffusion objective itself, is the main source of MDMs' data efficiency, and that it helps AR models too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from workbench.algorithms.masked_diffusion import sampler_args
from workbench.config import TokenMaskingConfig
from workbench.diffusion import sample_times


def masking_rates(batch_size: int, device, rate: float | None = None, max_rate: float | None = None,
                  time_sampler: str | None = None, sampler_params: Mapping[str, float] | None = None
                  ) -> torch.Tensor:
    """Per-sequence masking rate: fixed ``rate``, r ~ U(0, ``max_rate``), or r from a diffusion time sampler
    (name and parameters, as :func:`workbench.diffusion.sample_times`), the first one given."""
    if rate is not None:
        return torch.full((batch_size,), rate, device=device)
    if max_rate is not None:
        return max_rate * torch.rand(batch_size, device=device)
    if time_sampler is None:
        raise ValueError("masking_rates needs rate, max_rate or time_sampler")
    return sample_times(time_sampler, batch_size, 0.0, device, params=sampler_params)[0]


def special_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids of a workbench tokenizer's special tokens (EOS, mask; BERT's [PAD], [UNK], [CLS] too). An id-only
    vocabulary (the benchmark's random tokens) has just EOS and the mask."""
    inner = getattr(tokenizer, "tokenizer", None)
    added = inner.get_added_tokens_decoder() if inner is not None else {}
    return tuple(sorted({tokenizer.eos_id, tokenizer.mask_id, *(i for i, tok in added.items() if tok.special)}))


def apply_token_masking(tokens: torch.Tensor, rate: torch.Tensor, mask_id: int, vocab_size: int,
                        replacement: str = "mask", protected_ids: tuple[int, ...] = (),
                        special_ids: Iterable[int] = ()) -> dict[str, torch.Tensor]:
    """Corrupt each input position with probability ``rate`` (per sequence, shape (B,)).

    Returns the batch keys the AR objective reads: ``inputs`` (mask id or a random real token at corrupted
    positions) or, for ``zero``, unchanged inputs plus ``zero_embed`` (those positions' embeddings are zeroed,
    without a 1/(1-p) rescale). Tokens in ``protected_ids`` (e.g. EOS) are never corrupted. ``random`` draws
    uniformly from the real tokens: ids below ``vocab_size`` except the mask id and ``special_ids`` (EOS, ...)."""
    corrupt = torch.rand(tokens.shape, device=tokens.device) < rate[:, None]
    if protected_ids:
        corrupt &= ~torch.isin(tokens, torch.tensor(protected_ids, device=tokens.device))
    if replacement == "mask":
        return {"inputs": tokens.masked_fill(corrupt, mask_id)}
    if replacement == "random":
        excluded = torch.tensor(sorted({mask_id, *special_ids}), device=tokens.device)
        allowed = torch.arange(vocab_size, device=tokens.device)
        allowed = allowed[~torch.isin(allowed, excluded)]
        if allowed.numel() == 0:
            raise ValueError("random replacement: the vocabulary holds no real token")
        random = allowed[torch.randint(0, allowed.numel(), tokens.shape, device=tokens.device)]
        return {"inputs": torch.where(corrupt, random, tokens)}
    if replacement == "zero":
        return {"inputs": tokens, "zero_embed": corrupt}
    raise ValueError(f"unknown replacement {replacement!r}; allowed: mask, zero, random")


class TokenMasking(Algorithm):
    """Corrupts each training batch's inputs after it leaves the dataloader (never evaluation batches).

    Random replacements never draw EOS, the mask id or ``special_ids`` (pass
    :func:`special_token_ids` of the tokenizer for tokenizers with more special tokens, e.g. BERT)."""

    def __init__(self, cfg: TokenMaskingConfig, mask_id: int, eos_id: int, vocab_size: int,
                 special_ids: Iterable[int] = ()):
        self.cfg, self.mask_id, self.vocab_size = cfg, mask_id, vocab_size
        self.protected = () if cfg.mask_special else (eos_id,)
        self.special_ids = tuple(sorted({eos_id, mask_id, *special_ids}))
        self.sampler = sampler_args(cfg.time_sampler) if cfg.time_sampler is not None else (None, None)

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        tokens = state.batch["tokens"]
        rate = masking_rates(tokens.shape[0], tokens.device, self.cfg.rate, self.cfg.max_rate, *self.sampler)
        state.batch.update(apply_token_masking(tokens, rate, self.mask_id, self.vocab_size, self.cfg.replacement,
                                               self.protected, self.special_ids))
