"""Scoring continuations under AR and masked-diffusion models: pure functions of (net, token rows).

A row is ``[EOS, context..., continuation..., pad...]`` with its valid ``length``, ``cont_start`` and a ``key``
(the item's index in its file). Every scorer returns, per row, the continuation's log-likelihood (exact or
estimated), the estimator's standard error and whether every continuation token is the model's argmax:

- ``ar``: sum_j log p(x_j | x_<j) with causal attention (prefix-LM models: bidirectional over the context).
- ``mc-elbo``: the masked-diffusion ELBO of the continuation given the visible context, Monte Carlo over N
  stratified times. ``exact`` masking (SMDM/LLaDA; RADD eq. 7): l = ceil(n t) of the n continuation tokens masked,
  weight n/l, t_k = (k + u_k)/N; ``bernoulli`` (MDLM eq. 10): each token masked with rate t, weight 1/t,
  t_k in [eps, 1]. Per-row standard error = sample std / sqrt(N) (conservative for stratified t). It bounds
  log p_theta(continuation | context) of the any-order reverse process (exact masking, or bernoulli at eps = 0;
  with eps > 0 the bernoulli form is MDLM's truncated estimate, not strictly a bound); equality holds when the
  model's conditionals are consistent, i.e. the exact conditionals of one joint distribution.
- ``chain``: chain rule left to right, log p(x_j | context, x_<j, [MASK] * (n - j)), one forward per token. It is
  the exact likelihood of left-to-right decoding (for shifted models, of the AR-compatible factorisation).
- ``pll``: pseudo-log-likelihood (Salazar et al. 2020): sum_j log p(x_j | all other tokens), one token masked.
- guidance (``cfg_weight`` w != 0, diffusion scorers; unsupervised CFG of Nie et al. 2024, SMDM): logits
  u + (w + 1)(c - u), where u comes from a second pass with the context tokens masked.

Each scorer expands rows into *views* (a row with some positions masked, some target positions scored, and a
weight); all views of a batch run through the network in chunks of ``rows_per_forward`` rows, so Python loops
only over forward passes, never over items, samples or tokens. The LM head is applied only at scored positions
(hidden states -> head), the bulk of the cost for long contexts and large vocabularies. Noise is hashed from
(seed, task, item, sample, position within the continuation), so every run sees the same masks and the choices
of one item share them (common random numbers: lower variance for the comparison between choices).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workbench.diffusion import hash_uniform, mask_positions, token_nll
from workbench.objectives import prefix_lm_mask

SCORERS = ("ar", "mc-elbo", "chain", "pll")
CAUSAL_OBJECTIVES = ("ar", "prefix_lm", "dual")  # trained with next-token prediction: the ar scorer is exact
DIFFUSION_OBJECTIVES = ("mdm", "dual")
ELBO_EPS = 1e-3  # smallest masking rate for bernoulli masking (the training default)
_SALT_TIME, _SALT_MASK, _SALT_TIE = 11, 12, 13


@dataclass
class Rows:
    """R left-aligned rows; positions ``cont_start <= i < length`` hold the continuation."""

    tokens: torch.Tensor  # (R, L) int64
    length: torch.Tensor  # (R,)
    cont_start: torch.Tensor  # (R,)
    key: torch.Tensor  # (R,) item index: the noise key (shared by the choices of an item)

    @classmethod
    def from_lists(cls, rows: list[list[int]], cont_start: list[int], keys: list[int] | None = None,
                   pad_id: int = 0, device: str | torch.device = "cpu") -> Rows:
        length = max(len(r) for r in rows)
        tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
        keys = list(range(len(rows))) if keys is None else keys
        return cls(tokens.to(device), torch.tensor([len(r) for r in rows], device=device),
                   torch.tensor(cont_start, device=device), torch.tensor(keys, device=device))

    @property
    def n(self) -> int:
        return self.tokens.shape[0]

    @property
    def cont_len(self) -> torch.Tensor:
        return self.length - self.cont_start

    def positions(self) -> torch.Tensor:
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)

    def cont_mask(self) -> torch.Tensor:
        pos = self.positions()[None, :]
        return (pos >= self.cont_start[:, None]) & (pos < self.length[:, None])


@dataclass
class RowScores:
    logprob: torch.Tensor  # (R,) float64: continuation log-likelihood (exact) or its estimate
    stderr: torch.Tensor  # (R,) float64: Monte Carlo standard error (0 for exact scorers, nan for one sample)
    greedy: torch.Tensor  # (R,) bool: every continuation token is the argmax under the scorer's conditioning


# --------------------------------------------------------------------------------------------------------------
# the one forward path: views of rows -> summed target log-probabilities


def _logits_at(net, x: torch.Tensor, causal: bool, attn: torch.Tensor | None, rows: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
    """Logits at (rows, pos) only; the head runs on those positions when the net exposes hidden_states/head."""
    if hasattr(net, "hidden_states") and hasattr(net, "head"):
        return net.head(net.hidden_states(x, causal=causal, attn_mask=attn)[rows, pos])
    return net(x, causal=causal, attn_mask=attn)[rows, pos]


def view_logprobs(net, rows: Rows, view_row: torch.Tensor, mask: torch.Tensor | None, target: torch.Tensor, *,
                  causal: bool, shifted: bool, vocab_size: int, mask_id: int = -1, subs: bool = False,
                  cfg_weight: float = 0.0, prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over views: row ``view_row[v]`` with ``mask[v]`` positions replaced by the mask token.

    Returns per view the summed log-probability of the original tokens at the ``target[v]`` positions (float64)
    and how many of them are not the argmax over the real vocabulary. Shifted: position i predicts token i+1."""
    tokens = rows.tokens[view_row]
    x = tokens if mask is None else tokens.masked_fill(mask, mask_id)
    n_views, length = x.shape
    pos = rows.positions()
    attn = None
    if causal and prefix:  # prefix-LM: EOS + context attended bidirectionally, causal after it
        attn = prefix_lm_mask(rows.cont_start[view_row], length)
    elif not causal:
        valid = pos[None, :] < rows.length[view_row][:, None]
        if not bool(valid.all()):  # key padding: nobody attends to pads (the rows then match their unpadded self)
            attn = valid[:, None, None, :].expand(n_views, 1, length, length)
    v_idx, t_pos = target.nonzero(as_tuple=True)
    targets = tokens[v_idx, t_pos]
    p_pos = t_pos - 1 if shifted else t_pos
    if cfg_weight:
        context = (pos[None, :] >= 1) & (pos[None, :] < rows.cont_start[view_row][:, None])
        x = torch.cat([x, x.masked_fill(context, mask_id)])  # unconditional pass: the context masked
        attn = None if attn is None else torch.cat([attn, attn])
        logits = _logits_at(net, x, causal, attn, torch.cat([v_idx, v_idx + n_views]), torch.cat([p_pos, p_pos]))
        cond, uncond = logits.float().chunk(2)
        logits = uncond + (cfg_weight + 1) * (cond - uncond)  # SMDM's unsupervised CFG
    else:
        logits = _logits_at(net, x, causal, attn, v_idx, p_pos).float()
    if subs:  # SUBS (MDLM sec. 3.2): the mask token is never predicted
        logits[:, mask_id] = float("-inf")
    nll = token_nll(logits, targets)
    wrong = logits[:, :vocab_size].argmax(dim=-1) != targets
    logp = torch.zeros(n_views, dtype=torch.float64, device=x.device).index_add_(0, v_idx, -nll.double())
    n_wrong = torch.zeros(n_views, dtype=torch.long, device=x.device).index_add_(0, v_idx, wrong.long())
    return logp, n_wrong


ViewFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]


def run_views(net, rows: Rows, n_views: int, make_views: ViewFn, rows_per_forward: int, **options: Any
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All views in chunks of ``rows_per_forward``: (view_row, weight * logprob, n_wrong), each (n_views,).

    ``make_views(ids) -> (view_row, mask, target, weight)`` builds a chunk of views on the fly (masks hashed)."""
    device = rows.tokens.device
    rows_out, values, wrongs = [], [], []
    per_forward = max(1, rows_per_forward // (2 if options.get("cfg_weight") else 1))
    for start in range(0, n_views, per_forward):
        ids = torch.arange(start, min(n_views, start + per_forward), device=device)
        view_row, mask, target, weight = make_views(ids)
        logp, n_wrong = view_logprobs(net, rows, view_row, mask, target, **options)
        rows_out.append(view_row)
        values.append(weight.double() * logp)
        wrongs.append(n_wrong)
    if not rows_out:
        empty = torch.zeros(0, device=device)
        return empty.long(), empty.double(), empty.long()
    return torch.cat(rows_out), torch.cat(values), torch.cat(wrongs)


def _per_row(rows: Rows, view_row: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.zeros(rows.n, dtype=values.dtype, device=values.device).index_add_(0, view_row, values)


# --------------------------------------------------------------------------------------------------------------
# scorers


def score_ar(net, rows: Rows, *, vocab_size: int, rows_per_forward: int = 64, prefix: bool = False) -> RowScores:
    """Exact continuation log-likelihood of a next-token model, one causal forward per row."""
    target_all = rows.cont_mask()

    def views(ids):
        return ids, None, target_all[ids], torch.ones(len(ids), device=ids.device)

    view_row, values, wrong = run_views(net, rows, rows.n, views, rows_per_forward, causal=True, shifted=True,
                                        vocab_size=vocab_size, prefix=prefix)
    zeros = torch.zeros(rows.n, dtype=torch.float64, device=values.device)
    return RowScores(_per_row(rows, view_row, values), zeros, _per_row(rows, view_row, wrong) == 0)


def _mdm_options(mask_id: int, shifted: bool, subs: bool, vocab_size: int, cfg_weight: float) -> dict[str, Any]:
    return {"causal": False, "shifted": shifted, "vocab_size": vocab_size, "mask_id": mask_id, "subs": subs,
            "cfg_weight": cfg_weight}


def score_mc_elbo(net, rows: Rows, *, mask_id: int, shifted: bool, vocab_size: int, samples: int = 32,
                  subs: bool = True, rows_per_forward: int = 64, seed: int = 0, salt: int = 0,
                  masking: str = "exact", eps: float = ELBO_EPS, cfg_weight: float = 0.0,
                  greedy: bool = False) -> RowScores:
    """Monte Carlo ELBO of each continuation with the context visible: all (row, sample) views batched.

    ``greedy``: also one view per row with the whole continuation masked, for the greedy-match flag (one-step
    parallel decoding); otherwise ``RowScores.greedy`` is all False."""
    if masking not in ("exact", "bernoulli"):
        raise ValueError(f"unknown masking {masking!r}; allowed: exact, bernoulli")
    cont = rows.cont_mask()
    pos = rows.positions()
    n_samples = samples

    def views(ids):
        row, k = ids // n_samples, ids % n_samples
        key = rows.key[row]
        offset = hash_uniform(seed, salt, _SALT_TIME, key, k).to(ids.device)
        if masking == "exact":  # l = ceil(n t) is uniform on {1..n} for t uniform on (0, 1)
            t = (k + offset) / n_samples
        else:
            t = eps + (1 - eps) * (k + offset) / n_samples
        rel = (pos[None, :] - rows.cont_start[row][:, None]).clamp(min=0)  # position within the continuation
        noise = hash_uniform(seed, salt, _SALT_MASK, key[:, None], k[:, None], rel).to(ids.device)
        mask, weight = mask_positions(t, cont[row], masking, noise)
        return row, mask, mask, weight

    options = _mdm_options(mask_id, shifted, subs, vocab_size, cfg_weight)
    view_row, values, _ = run_views(net, rows, rows.n * n_samples, views, rows_per_forward, **options)
    total, squares = _per_row(rows, view_row, values), _per_row(rows, view_row, values.square())
    mean = total / n_samples
    if n_samples > 1:
        variance = ((squares - n_samples * mean.square()) / (n_samples - 1)).clamp(min=0)
        stderr = (variance / n_samples).sqrt()
    else:
        stderr = torch.full_like(mean, float("nan"))
    flags = torch.zeros(rows.n, dtype=torch.bool, device=mean.device)
    if greedy:
        def all_masked(ids):
            return ids, cont[ids], cont[ids], torch.ones(len(ids), device=ids.device)

        g_row, _, g_wrong = run_views(net, rows, rows.n, all_masked, rows_per_forward, **options)
        flags = _per_row(rows, g_row, g_wrong) == 0
    return RowScores(mean, stderr, flags)


def _token_views(rows: Rows, left_to_right: bool) -> tuple[int, ViewFn]:
    """One view per (row, continuation token j): chain masks tokens >= j, pll masks token j only."""
    counts = rows.cont_len
    view_rows = torch.repeat_interleave(torch.arange(rows.n, device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    steps = torch.arange(view_rows.shape[0], device=counts.device) - starts[view_rows]
    pos = rows.positions()

    def views(ids):
        row, step = view_rows[ids], steps[ids]
        rel = pos[None, :] - rows.cont_start[row][:, None]
        target = rel == step[:, None]
        mask = ((rel >= step[:, None]) & (rel < counts[row][:, None])) if left_to_right else target
        return row, mask, target, torch.ones(len(ids), device=ids.device)

    return int(view_rows.shape[0]), views


def _score_token_views(net, rows: Rows, left_to_right: bool, mask_id: int, shifted: bool, vocab_size: int,
                       subs: bool, rows_per_forward: int, cfg_weight: float) -> RowScores:
    """One forward view per (row, continuation token), all batched; the scores are exact (no estimator error)."""
    n_views, views = _token_views(rows, left_to_right=left_to_right)
    options = _mdm_options(mask_id, shifted, subs, vocab_size, cfg_weight)
    view_row, values, wrong = run_views(net, rows, n_views, views, rows_per_forward, **options)
    zeros = torch.zeros(rows.n, dtype=torch.float64, device=values.device)
    return RowScores(_per_row(rows, view_row, values), zeros, _per_row(rows, view_row, wrong) == 0)


def score_chain(net, rows: Rows, *, mask_id: int, shifted: bool, vocab_size: int, subs: bool = True,
                rows_per_forward: int = 64, cfg_weight: float = 0.0) -> RowScores:
    """Chain rule: unmask the continuation left to right; all (row, token) views batched."""
    return _score_token_views(net, rows, True, mask_id, shifted, vocab_size, subs, rows_per_forward, cfg_weight)


def score_pll(net, rows: Rows, *, mask_id: int, shifted: bool, vocab_size: int, subs: bool = True,
              rows_per_forward: int = 64, cfg_weight: float = 0.0) -> RowScores:
    """Pseudo-log-likelihood: each continuation token masked alone (not a normalised likelihood)."""
    return _score_token_views(net, rows, False, mask_id, shifted, vocab_size, subs, rows_per_forward, cfg_weight)


# --------------------------------------------------------------------------------------------------------------
# the Composer entry point


def resolve_scorer(requested: str, objective: str, shifted: bool) -> str:
    """``auto`` -> ar for next-token models (ar, prefix_lm, dual), mc-elbo for mdm; refuse invalid pairs."""
    if requested == "auto":
        return "ar" if objective in CAUSAL_OBJECTIVES else "mc-elbo"
    if requested not in SCORERS:
        raise ValueError(f"unknown scorer {requested!r}; allowed: auto, {', '.join(SCORERS)}")
    if requested == "ar" and (objective not in CAUSAL_OBJECTIVES or not shifted):
        raise ValueError(f"the ar scorer needs a model trained with next-token prediction (objective ar, prefix_lm "
                         f"or dual); this model's objective is {objective!r}: use mc-elbo, chain or pll")
    if requested != "ar" and objective not in DIFFUSION_OBJECTIVES:
        raise ValueError(f"the {requested} scorer needs a masked-diffusion model (objective mdm or dual); this "
                         f"model's objective is {objective!r}: use the ar scorer")
    return requested


def choose(scores: torch.Tensor, valid: torch.Tensor, tie_noise: torch.Tensor) -> torch.Tensor:
    """Argmax over choices; exact ties broken by ``tie_noise`` (seeded), never by position."""
    scores = scores.masked_fill(~valid, float("-inf"))
    best = scores.max(dim=1, keepdim=True).values
    candidates = (scores == best) & valid
    return tie_noise.masked_fill(~candidates, -1.0).argmax(dim=1)


def score_rows(net, rows: Rows, scorer: str, *, mask_id: int, shifted: bool, subs: bool, vocab_size: int,
               samples: int = 32, rows_per_forward: int = 64, seed: int = 0, salt: int = 0, masking: str = "exact",
               cfg_weight: float = 0.0, prefix: bool = False, greedy: bool = False) -> RowScores:
    """Dispatch to one scorer (already resolved: ar, mc-elbo, chain or pll)."""
    if scorer == "ar":
        return score_ar(net, rows, vocab_size=vocab_size, rows_per_forward=rows_per_forward, prefix=prefix)
    common = {"mask_id": mask_id, "shifted": shifted, "vocab_size": vocab_size, "subs": subs,
              "rows_per_forward": rows_per_forward, "cfg_weight": cfg_weight}
    if scorer == "mc-elbo":
        return score_mc_elbo(net, rows, samples=samples, seed=seed, salt=salt, masking=masking, greedy=greedy,
                             **common)
    if scorer == "chain":
        return score_chain(net, rows, **common)
    if scorer == "pll":
        return score_pll(net, rows, **common)
    raise ValueError(f"unknown scorer {scorer!r}; allowed: {', '.join(SCORERS)}")


@torch.no_grad()
def score_batch(model, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A task batch (workbench.evaluation.tasks.collate_items) -> ``{metric key: (num, den)}`` sums on device."""
    from workbench.evaluation.tasks import LANGUAGE_MODELING

    objective = getattr(getattr(model, "objective", None), "name", "ar")
    scorer = resolve_scorer(batch["scorer"], objective, bool(model.shifted))
    cfg_weight = float(batch.get("cfg_weight", 0.0))
    if scorer == "ar" and cfg_weight:
        warnings.warn("cfg_weight is ignored by the ar scorer (guidance applies to the diffusion scorers)",
                      stacklevel=2)
        cfg_weight = 0.0
    tokens = batch["tokens"]
    n_items, n_choices, length = tokens.shape
    device = tokens.device
    valid = batch["choice_valid"]
    flat = valid.reshape(-1).nonzero().squeeze(1)
    items = batch["item"]
    rows = Rows(tokens.reshape(-1, length)[flat], batch["length"].reshape(-1)[flat],
                batch["cont_start"].reshape(-1)[flat], items.repeat_interleave(n_choices)[flat])
    language_modeling = batch["schema"] == LANGUAGE_MODELING
    seed, salt = int(batch["seed"]), int(batch.get("task_key", 0))
    scores = score_rows(model.net, rows, scorer, mask_id=model.mask_id, shifted=bool(model.shifted),
                        subs=bool(getattr(model, "subs", True)), vocab_size=model.vocab_size,
                        samples=int(batch["samples"]), rows_per_forward=int(batch["rows_per_forward"]), seed=seed,
                        salt=salt, masking=str(batch.get("masking", "exact")), cfg_weight=cfg_weight,
                        prefix=objective == "prefix_lm", greedy=language_modeling)
    loglik = torch.full((n_items * n_choices,), float("-inf"), dtype=torch.float64, device=device)
    loglik[flat] = scores.logprob
    loglik = loglik.view(n_items, n_choices)
    count = torch.tensor(float(n_items), dtype=torch.float64, device=device)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if language_modeling:
        greedy = torch.zeros(n_items * n_choices, dtype=torch.bool, device=device)
        greedy[flat] = scores.greedy
        correct = greedy.view(n_items, n_choices)[:, 0]
        out["ppl"] = (-loglik[:, 0]).sum(), count
    else:
        choice = torch.arange(n_choices, device=device)
        tie = hash_uniform(seed, salt, _SALT_TIE, items[:, None], choice[None, :]).to(device)
        gold = batch["gold"]
        correct = choose(loglik, valid, tie) == gold
        for name, divisor in (("acc_norm", "cont_chars"), ("acc_bytes", "cont_bytes")):  # harness: characters
            normed = choose(loglik / batch[divisor].double(), valid, tie) == gold
            out[name] = normed.double().sum(), count
    hits = correct.double().sum()
    out["acc"] = hits, count
    out["stderr"] = hits, count
    out["elbo_stderr"] = scores.stderr.sum(), torch.tensor(float(rows.n), dtype=torch.float64, device=device)
    out["truncated"] = batch["truncated"].double().sum(), count
    return out
