"""One NELBO convention everywhere (MDLM's): NELBO = E_{t~U(eps,1)}[(1/t) sum_masked -log p], i.e. the integral of
the per-t loss over [eps, 1] divided by (1 - eps); exact-count masking uses eps = 0 (its discrete any-order form).

A deterministic toy "denoiser" over a 3-id vocabulary (mask id 1, not the last id) and 4 positions is small enough to
enumerate every mask, so the NELBO is computed exactly (Gauss-Legendre on a polynomial in t: exact to rounding).
Every estimator's expectation is then compared with it for eps in {0, 1e-3, 0.2}: the training loss under uniform,
antithetic, stratified and a bell-shaped sampler with ``elbo`` weighting (and ``sampled`` under the uniform
sampler), the fixed validation estimator and the downstream MC-ELBO scorer. The expectations are Monte Carlo
averages with a fixed seed; the tolerance (1.5% relative) is more than 4 standard errors of each average (measured:
at most 0.35%, the bell-shaped sampler's) and far below the 20% that separates the two conventions at eps = 0.2.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from workbench.diffusion import mdm_loss, nelbo_fixed
from workbench.evaluation.scoring import Rows, score_mc_elbo

VOCAB, MASK, LENGTH = 3, 1, 4
CLEAN = torch.tensor([0, 2, 2, 0])  # the sequence whose NELBO is estimated (real ids 0 and 2)
ANCHOR = 0  # the scorer's always-visible first token (EOS in real rows)
EPS = [0.0, 1e-3, 0.2]
TOLERANCE = 0.015  # relative; see the module docstring
BELL = {"mu": 0.5, "sigma": 0.25}  # truncated normal on [0, 1]: bounded importance weights


class TableNet(torch.nn.Module):
    """Logits at position i: a fixed random function of (i, the whole input), plus a bonus for the clean token that
    grows with the number of visible tokens, so the per-t loss varies strongly with t (low t: confident)."""

    def __init__(self, favourite: torch.Tensor, seed: int = 0, bonus: float = 1.0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        max_len = len(favourite)
        self.table = torch.randn(max_len, VOCAB**max_len, VOCAB, generator=generator)
        self.favourite, self.bonus = favourite, bonus  # rows of length L favour favourite[-L:]

    def forward(self, x, causal=False, attn_mask=None, zero_embed=None):
        length = x.shape[1]
        positions = torch.arange(length)
        code = (x * VOCAB**positions).sum(dim=1)
        logits = self.table[positions[None, :], code[:, None]]  # (B, L, V), a fresh tensor
        visible = (x != MASK).sum(dim=1).float()
        onehot = torch.nn.functional.one_hot(self.favourite[-length:], VOCAB).float()
        return logits + self.bonus * visible[:, None, None] * onehot[None]


def exact_nelbo(net, tokens: torch.Tensor, maskable: torch.Tensor, shifted: bool, eps: float, masking: str) -> float:
    """Sum over the sequence (nats) of the NELBO by enumeration of every mask of the maskable positions.

    f(m) = sum_{i in m} -log p(x^i | x_m); bernoulli: (1/(1-eps)) int_eps^1 sum_m t^(|m|-1) (1-t)^(n-|m|) f(m) dt;
    exact: sum_k (1/k) mean_{|m|=k} f(m) (RADD's discrete form, equal to the bernoulli value at eps = 0)."""
    positions = maskable.nonzero().flatten().tolist()
    n = len(positions)
    by_size: dict[int, list[float]] = {}
    for size in range(1, n + 1):
        for subset in itertools.combinations(positions, size):
            mask = torch.zeros(len(tokens), dtype=torch.bool)
            mask[list(subset)] = True
            logits = net(tokens.masked_fill(mask, MASK)[None])[0].double()
            logits[:, MASK] = -math.inf  # SUBS
            logp = logits.log_softmax(dim=-1)
            by_size.setdefault(size, []).append(-sum(float(logp[i - 1 if shifted else i, tokens[i]]) for i in subset))
    if masking == "exact":
        return sum(float(np.mean(values)) / size for size, values in by_size.items())
    nodes, weights = np.polynomial.legendre.leggauss(16)  # exact for polynomials of degree < 32
    t = eps + (1 - eps) * (nodes + 1) / 2
    integrand = sum(sum(values) * t ** (size - 1) * (1 - t) ** (n - size) for size, values in by_size.items())
    integral = float((weights * integrand).sum()) * (1 - eps) / 2
    return integral / (1 - eps)


@pytest.fixture(scope="module")
def net() -> TableNet:
    return TableNet(torch.cat([torch.tensor([ANCHOR]), CLEAN]))


def _maskable(shifted: bool) -> torch.Tensor:
    maskable = torch.ones(LENGTH, dtype=torch.bool)
    maskable[0] = not shifted
    return maskable


def test_the_exact_values_are_consistent(net):
    """Sanity of the reference: exact-count and bernoulli agree at eps = 0, and eps matters for this model."""
    maskable = _maskable(False)
    values = {eps: exact_nelbo(net, CLEAN, maskable, False, eps, "bernoulli") for eps in EPS}
    assert exact_nelbo(net, CLEAN, maskable, False, 0.3, "exact") == pytest.approx(values[0.0], rel=1e-12)
    assert values[0.2] > 1.05 * values[0.0]  # excluding the confident low-t region raises the NELBO


def _training_mean(net, eps: float, masking: str, sampler: str, weighting: str = "elbo", shifted: bool = False,
                   batch: int = 1 << 15, repeats: int = 8) -> float:
    torch.manual_seed(1234)
    tokens = CLEAN.expand(batch, -1)
    losses = [mdm_loss(net, tokens, MASK, time_sampler=sampler, sampler_params=BELL, eps=eps, weighting=weighting,
                       masking=masking, shifted=shifted)["loss"].item() for _ in range(repeats)]
    return float(np.mean(losses))


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("masking", ["bernoulli", "exact"])
@pytest.mark.parametrize("sampler", ["uniform", "antithetic", "stratified", "truncated_normal"])
def test_training_loss_expectation_is_the_nelbo(net, sampler, masking, eps):
    """mdm_loss is per token: its expectation is the sequence NELBO / number of maskable positions."""
    exact = exact_nelbo(net, CLEAN, _maskable(False), False, eps, masking) / LENGTH
    assert _training_mean(net, eps, masking, sampler) == pytest.approx(exact, rel=TOLERANCE)


@pytest.mark.parametrize("eps", EPS)
def test_sampled_weighting_under_the_uniform_sampler_is_the_same_nelbo(net, eps):
    exact = exact_nelbo(net, CLEAN, _maskable(False), False, eps, "bernoulli") / LENGTH
    assert _training_mean(net, eps, "bernoulli", "uniform", weighting="sampled") == pytest.approx(exact, rel=TOLERANCE)


@pytest.mark.parametrize("masking", ["bernoulli", "exact"])
def test_shifted_training_loss_expectation_is_the_nelbo(net, masking):
    """Shifted: position 0 is the visible anchor, position i predicts token i + 1."""
    eps = 0.2
    exact = exact_nelbo(net, CLEAN, _maskable(True), True, eps, masking) / (LENGTH - 1)
    assert _training_mean(net, eps, masking, "stratified", shifted=True) == pytest.approx(exact, rel=TOLERANCE)


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("shifted", [False, True])
def test_validation_estimator_expectation_is_the_nelbo(net, eps, shifted):
    """nelbo_fixed's hashed noise differs per sequence index: averaging over indices is the expectation."""
    count = 1 << 15
    tokens = CLEAN.expand(count, -1)
    per_sequence, counts = nelbo_fixed(net, tokens, torch.arange(count), samples=8, mask_id=MASK, shifted=shifted,
                                       eps=eps)
    assert torch.all(counts == LENGTH - int(shifted))
    exact = exact_nelbo(net, CLEAN, _maskable(shifted), shifted, eps, "bernoulli")
    assert per_sequence.mean().item() == pytest.approx(exact, rel=TOLERANCE)


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("masking", ["bernoulli", "exact"])
def test_mc_elbo_scorer_expectation_is_the_nelbo(net, masking, eps):
    """Rows [anchor, clean...] with the continuation after the anchor; each row key draws independent noise, so the
    mean over rows of -logprob is the continuation's NELBO (the anchor is the always-visible context)."""
    row = [ANCHOR, *CLEAN.tolist()]
    count = 1 << 13
    rows = Rows.from_lists([row] * count, [1] * count, list(range(count)))
    scores = score_mc_elbo(net, rows, mask_id=MASK, shifted=False, vocab_size=VOCAB, samples=8, masking=masking,
                           eps=eps, rows_per_forward=1 << 14)
    maskable = torch.tensor([False] + [True] * LENGTH)
    exact = exact_nelbo(net, torch.tensor(row), maskable, False, eps, masking)
    assert -scores.logprob.mean().item() == pytest.approx(exact, rel=TOLERANCE)


@pytest.mark.parametrize("sampler", ["uniform", "antithetic", "stratified"])
def test_elbo_and_sampled_weighting_are_identical_under_uniform_samplers(net, sampler):
    losses = []
    for weighting in ("elbo", "sampled"):
        torch.manual_seed(3)
        losses.append(mdm_loss(net, CLEAN.expand(64, -1), MASK, time_sampler=sampler, eps=0.2,
                               weighting=weighting)["loss"])
    assert torch.equal(*losses)
