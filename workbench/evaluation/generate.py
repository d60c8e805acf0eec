"""Samples from AR and masked-diffusion models, and their generative perplexity.

Every sample starts at a document boundary (position 0 = EOS, as after a document in training), optionally
followed by ``--prompt``.

- AR (``--mode ar``; auto for objectives ar, prefix_lm, dual): token by token with temperature, top-k and top-p
  (nucleus) filtering; one causal forward over the prefix per token.
- MDM (``--mode mdm``; auto for objective mdm): ancestral sampling of MDLM (Sahoo et al. 2024) for the linear
  schedule alpha_t = 1 - t over T steps: from t to s = t - 1/T each masked position is revealed with probability
  (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t, its token drawn from p_theta(x | x_t) (never the mask: SUBS).
  ``--cached`` (default): the denoiser does not depend on t, so a row in which a step revealed nothing keeps its
  previous distribution instead of running a new forward (MDLM's cached sampler; same samples, fewer forwards).
  Token draws use float64 Gumbel-max: float32 categorical sampling lowers the effective temperature and flatters
  generative perplexity (Zheng et al. 2024).
- Generative perplexity (MDLM): the decoded samples are re-tokenized with the tokenizer of an AR checkpoint
  (``--ppl-model``) and scored by it, exp(total NLL / scored tokens) over windows of its length; reported with
  the mean unigram entropy of the samples' tokens (degenerate, repetitive samples have low entropy and
  misleadingly low generative perplexity).

Output: samples printed (``--out FILE`` writes them as JSON lines); tidy rows (split ``generate_ar`` or
``generate_mdm_T<steps>``, metrics ``entropy``, ``forwards`` per sample and ``gen_ppl``) go to
``<run>/downstream.parquet`` or ``--rows FILE`` (see workbench.evaluation.cli for the file's semantics). The
command (``workbench generate CHECKPOINT``) is workbench.commands.generate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------------------------
# sampling


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                  ) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering over the last dimension (-inf = excluded)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def draw(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row by float64 Gumbel-max."""
    uniform = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
    return (logits.double() + gumbel).argmax(dim=-1)


def _allowed(logits: torch.Tensor, vocab_size: int, mask_id: int) -> torch.Tensor:
    logits = logits.float()
    logits[..., vocab_size:] = float("-inf")  # padded embedding rows never occur
    logits[..., mask_id] = float("-inf")
    return logits


@torch.no_grad()
def sample_ar(net, prefix: torch.Tensor, length: int, *, vocab_size: int, mask_id: int, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``prefix`` (B, P) to (B, length) token by token (one causal forward over the prefix per token)."""
    x = prefix
    while x.shape[1] < length:
        logits = _allowed(net(x, causal=True)[:, -1], vocab_size, mask_id)
        token = draw(filter_logits(logits, temperature, top_k, top_p), generator)
        x = torch.cat([x, token[:, None]], dim=1)
    return x


@dataclass
class MDMSample:
    tokens: torch.Tensor  # (B, L)
    forwards: int  # network calls (rows x forwards would count work; this counts passes)
    row_forwards: torch.Tensor  # (B,) forwards each row needed


@torch.no_grad()
def sample_mdm(net, prefix: torch.Tensor, length: int, steps: int, *, mask_id: int, shifted: bool, vocab_size: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cached: bool = True,
               generator: torch.Generator | None = None) -> MDMSample:
    """Ancestral unmasking from ``prefix`` + masks to (B, length) in ``steps`` steps (see the module docstring)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    batch, device = prefix.shape[0], prefix.device
    x = torch.cat([prefix, torch.full((batch, length - prefix.shape[1]), mask_id, device=device)], dim=1)
    cache = None
    stale = torch.ones(batch, dtype=torch.bool, device=device)
    row_forwards = torch.zeros(batch, dtype=torch.long, device=device)
    forwards = 0
    for i in range(steps):
        masked = x == mask_id
        if not bool(masked.any()):
            break
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        reveal = masked & (torch.rand(x.shape, device=device, generator=generator) < (t - s) / t)
        # cached: only rows that changed since their last forward and reveal something now need the network
        need = stale & reveal.any(dim=1) if cached else torch.ones_like(stale)
        if cache is None or bool(need.any()):
            idx = torch.arange(batch, device=device) if cache is None else need.nonzero().squeeze(1)
            logits = net(x[idx], causal=False)
            if shifted:  # position i predicts token i+1: align so aligned[:, p] predicts token p
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            logits = _allowed(logits, vocab_size, mask_id)
            if cache is None:
                cache = logits
            else:
                cache[idx] = logits
            forwards += 1
            row_forwards[idx] += 1
            stale[idx] = False
        rows, positions = reveal.nonzero(as_tuple=True)
        if rows.numel():
            x[rows, positions] = draw(filter_logits(cache[rows, positions], temperature, top_k, top_p), generator)
            stale[rows] = True
    return MDMSample(x, forwards, row_forwards)


# --------------------------------------------------------------------------------------------------------------
# generative perplexity and entropy


def token_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the empirical unigram distribution of one sample's tokens."""
    if not ids:
        return 0.0
    counts = torch.bincount(torch.tensor(ids)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def generative_perplexity(model, tokenizer, texts: list[str], seq_len: int, device: str | torch.device = "cpu",
                          rows_per_forward: int = 16) -> tuple[float, float, int]:
    """(perplexity, total NLL, scored tokens) of ``texts`` under an AR model, in windows of ``seq_len`` tokens
    overlapping by one (every token after the leading EOS is scored exactly once)."""
    from workbench.evaluation.scoring import Rows, score_ar

    windows: list[list[int]] = []
    for ids in tokenizer.encode_batch(texts):
        ids = [tokenizer.eos_id, *ids]
        for start in range(0, max(len(ids) - 1, 1), seq_len - 1):
            piece = ids[start:start + seq_len]
            if len(piece) > 1:
                windows.append(piece)
    if not windows:
        return math.nan, 0.0, 0
    rows = Rows.from_lists(windows, [1] * len(windows), pad_id=tokenizer.eos_id, device=device)
    scores = score_ar(model.net, rows, vocab_size=model.vocab_size, rows_per_forward=rows_per_forward)
    nll = float(-scores.logprob.sum())
    count = int((rows.length - 1).sum())
    return math.exp(min(nll / count, 700.0)), nll, count
