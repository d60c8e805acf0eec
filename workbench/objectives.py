"""Training objectives: AR next-token prediction, masked diffusion, their mixture, and prefix-LM.

An objective is a callable ``(net, batch) -> {"loss": ..., ...}``; the Composer model calls the one it holds.
AR is the default; the objective algorithms (workbench.algorithms) install another at Event.INIT.
Batches are dicts with ``tokens`` (B, L) and optionally the keys regularizers add: ``inputs`` (corrupted AR
inputs), ``zero_embed`` (positions whose input embedding is zeroed), ``objective`` (which objective this step
uses, dual step mode) and ``ar_fraction`` (dual sequence mode).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from workbench.diffusion import mdm_loss, token_nll


def z_loss_term(logits: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """PaLM z-loss: mean over scored positions of logsumexp(logits)^2 (keeps the softmax normaliser near 1).

    The normaliser is the cross-entropy's: over every logit the loss normalises over, so a SUBS mask logit set to
    -inf contributes nothing, whatever the mask id (slicing the vocabulary at the mask id is only right when the
    mask id is the last id)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    return (lse.square() * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def ar_loss(net, tokens: torch.Tensor, inputs: torch.Tensor | None = None, zero_embed: torch.Tensor | None = None,
            attn_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
            z_loss: float = 0.0) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy, nats per predicted token: position i predicts tokens[i+1] from inputs[:i+1].

    ``inputs`` (a corrupted copy of ``tokens``, e.g. by token masking) feed the model; targets stay the original
    tokens. ``loss_mask`` (B, L) marks which target tokens are scored (default: all but the first)."""
    inputs = tokens if inputs is None else inputs
    logits = net(inputs, causal=True, attn_mask=attn_mask, zero_embed=zero_embed)[:, :-1]
    nll = token_nll(logits, tokens[:, 1:])
    scored = torch.ones_like(nll) if loss_mask is None else loss_mask[:, 1:].to(nll.dtype)
    loss = (nll * scored).sum() / scored.sum().clamp(min=1)
    if z_loss:
        loss = loss + z_loss * z_loss_term(logits, scored)
    return {"loss": loss, "nll_sum": (nll * scored).sum().detach(), "count": scored.sum().detach()}


class ARObjective:
    name = "ar"

    def __init__(self, z_loss: float = 0.0):
        self.z_loss = z_loss

    def __call__(self, net, batch: dict) -> dict[str, torch.Tensor]:
        return ar_loss(net, batch["tokens"], batch.get("inputs"), batch.get("zero_embed"), z_loss=self.z_loss)


class MDMObjective:
    """The masked-diffusion loss (:func:`workbench.diffusion.mdm_loss`, whose keyword arguments ``diffusion``
    holds: time_sampler, sampler_params, eps, weighting, masking, subs, shifted) plus an optional z-loss."""

    name = "mdm"

    def __init__(self, mask_id: int, z_loss: float = 0.0, **diffusion: Any):
        self.mask_id, self.z_loss = mask_id, z_loss
        self.diffusion = diffusion
        self.shifted = bool(diffusion.get("shifted", False))

    def __call__(self, net, batch: dict) -> dict[str, torch.Tensor]:
        out = mdm_loss(net, batch["tokens"], self.mask_id, **self.diffusion)
        if self.z_loss:  # SUBS already set the mask logit to -inf: it drops out of the normaliser, whatever its id
            out["loss"] = out["loss"] + self.z_loss * z_loss_term(out["logits"], out["loss_mask"].float())
        return out


class DualObjective:
    """AR + MDM (Dual Language Models): the AR objective with causal attention on a fraction of steps or
    sequences, the diffusion objective with bidirectional attention on the rest.

    Step mode: the DualObjective algorithm marks each batch ``objective: ar|mdm``. Sequence mode: the first
    n_ar sequences of the (already shuffled) microbatch are AR, n_ar = alpha * B stochastically rounded (floor,
    plus one with probability frac(alpha * B)), so the realised AR fraction is alpha in expectation for any
    microbatch size; the loss is the token-weighted mixture
    (w_ar * sum AR nll + w_mdm * sum weighted MDM nll) / (number of predicted tokens)."""

    name = "dual"

    def __init__(self, mask_id: int, z_loss: float = 0.0, *, mode: str = "steps", ar_fraction: float = 0.5,
                 ar_weight: float = 1.0, mdm_weight: float = 1.0, **diffusion: Any):
        if mode not in ("steps", "sequences"):
            raise ValueError(f"unknown dual mode {mode!r}; allowed: steps, sequences")
        self.ar = ARObjective(z_loss)
        self.mdm = MDMObjective(mask_id, z_loss, **diffusion)
        self.mode, self.ar_fraction = mode, ar_fraction
        self.ar_weight, self.mdm_weight = ar_weight, mdm_weight

    def __call__(self, net, batch: dict) -> dict[str, torch.Tensor]:
        if self.mode == "steps":
            which = batch.get("objective", "mdm")
            out = (self.ar if which == "ar" else self.mdm)(net, batch)
            out["loss"] = out["loss"] * (self.ar_weight if which == "ar" else self.mdm_weight)
            return out
        tokens = batch["tokens"]
        n_ar = ar_sequences(float(batch.get("ar_fraction", self.ar_fraction)), tokens.shape[0])
        parts, counts = [], []
        if n_ar > 0:
            ar_batch = {key: value[:n_ar] for key, value in batch.items() if torch.is_tensor(value)}
            out = self.ar(net, ar_batch)
            parts.append(self.ar_weight * out["loss"])
            counts.append(n_ar * (tokens.shape[1] - 1))
        if n_ar < tokens.shape[0]:
            out = self.mdm(net, {"tokens": tokens[n_ar:]})
            parts.append(self.mdm_weight * out["loss"])
            counts.append((tokens.shape[0] - n_ar) * (tokens.shape[1] - int(self.mdm.shifted)))
        total = sum(counts)
        return {"loss": sum(part * (count / total) for part, count in zip(parts, counts))}


def ar_sequences(fraction: float, batch_size: int) -> int:
    """How many of ``batch_size`` sequences train AR: fraction * B rounded stochastically (E = fraction * B).

    The draw uses torch's global CPU generator (checkpointed, so resume-exact) and only when fraction * B is not
    an integer, so integer cases consume no randomness."""
    exact = fraction * batch_size
    whole = math.floor(exact + 1e-9)
    remainder = exact - whole
    if remainder > 1e-9 and torch.rand(()).item() < remainder:
        whole += 1
    return min(max(whole, 0), batch_size)


def prefix_lm_mask(prefix_len: torch.Tensor, length: int) -> torch.Tensor:
    """Attention mask (B, 1, L, L), True = may attend: key j is visible to query i if j <= i or j < prefix."""
    positions = torch.arange(length, device=prefix_len.device)
    causal = positions[None, :] <= positions[:, None]
    in_prefix = positions[None, None, :] < prefix_len[:, None, None]
    return (causal[None] | in_prefix)[:, None]


def prefix_lm_loss(net, tokens: torch.Tensor, prefix_len: torch.Tensor, inputs: torch.Tensor | None = None,
                   zero_embed: torch.Tensor | None = None, z_loss: float = 0.0) -> dict[str, torch.Tensor]:
    """AR loss on the tokens after a bidirectionally attended prefix of ``prefix_len`` tokens per sequence."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    scored = positions[None, :] >= prefix_len[:, None]
    return ar_loss(net, tokens, inputs, zero_embed, attn_mask=prefix_lm_mask(prefix_len, tokens.shape[1]),
                   loss_mask=scored, z_loss=z_loss)


class PrefixLMObjective:
    name = "prefix_lm"

    def __init__(self, min_prefix: float = 0.0, max_prefix: float = 0.5, z_loss: float = 0.0):
        self.min_prefix, self.max_prefix, self.z_loss = min_prefix, max_prefix, z_loss

    def __call__(self, net, batch: dict) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        length = tokens.shape[1]
        fraction = self.min_prefix + (self.max_prefix - self.min_prefix) * torch.rand(
            tokens.shape[0], device=tokens.device)
        prefix_len = (fraction * length).long()
        return prefix_lm_loss(net, tokens, prefix_len, batch.get("inputs"), batch.get("zero_embed"), self.z_loss)
