"""The mathematics of the objectives on toy cases with known answers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from scipy import stats

from workbench.diffusion import (
    hash_uniform,
    mask_positions,
    maskable_positions,
    mdm_loss,
    nelbo_fixed,
    sample_times,
    time_density,
    token_nll,
)
from workbench.objectives import ar_loss, prefix_lm_mask


@dataclass(frozen=True)
class Sampler:
    """A time sampler as the functional forms take it: a name and its parameters."""

    name: str
    a: float = 2.0
    b: float = 2.0
    mu: float = 0.0
    sigma: float = 1.0

    @property
    def params(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "mu": self.mu, "sigma": self.sigma}


SAMPLERS = [
    Sampler(name="uniform"),
    Sampler(name="antithetic"),
    Sampler(name="stratified"),
    Sampler(name="beta", a=2.0, b=3.0),
    Sampler(name="logit_normal", mu=0.3, sigma=0.8),
    Sampler(name="truncated_normal", mu=0.5, sigma=0.2),
]


class FixedLogits(torch.nn.Module):
    """Ignores its input: the same logits at every position (a context-free model)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, causal=True, attn_mask=None, zero_embed=None):
        return self.logits.expand(*input_ids.shape, -1).clone()


class CopyVisible(torch.nn.Module):
    """Toy denoiser for constant sequences (every token equals one symbol v < K): if any input token is
    visible it predicts that symbol with probability q, otherwise it is uniform over the K symbols."""

    def __init__(self, k: int, q: float):
        super().__init__()
        self.k, self.q = k, q

    def forward(self, input_ids, causal=False, attn_mask=None, zero_embed=None):
        visible = input_ids < self.k
        symbol = torch.where(visible, input_ids, 0).max(dim=1).values  # constant sequences: any visible token
        any_visible = visible.any(dim=1)
        probs = torch.full((input_ids.shape[0], self.k), (1 - self.q) / (self.k - 1))
        probs[torch.arange(len(symbol)), symbol] = self.q
        probs[~any_visible] = 1.0 / self.k
        logits = torch.cat([probs.log(), torch.zeros(len(symbol), 1)], dim=1)  # + the mask token's logit
        return logits[:, None, :].expand(-1, input_ids.shape[1], -1).clone()


def copy_visible_elbo(k: int, q: float, length: int, eps: float) -> float:
    """Closed form of the MDLM NELBO per token for CopyVisible on constant sequences:
    f(t) = (1 - t^(L-1)) (-log q) + t^(L-1) log K, averaged over t ~ U(eps, 1) (MDLM's convention)."""
    a, b = -math.log(q), math.log(k)
    return ((1 - eps) * a + (b - a) * (1 - eps**length) / length) / (1 - eps)


# ---------------------------------------------------------------------------------------------------------------


def test_ar_loss_equals_hand_computed_value():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    net = FixedLogits(probs.log())
    tokens = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1]])
    # predicted tokens: [1, 2, 3] and [3, 0, 1]
    expected = -(math.log(0.25) + math.log(0.125) + math.log(0.125) + math.log(0.125) + math.log(0.5)
                 + math.log(0.25)) / 6
    assert ar_loss(net, tokens)["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_ar_loss_scores_original_targets_when_inputs_are_corrupted():
    probs = torch.tensor([0.7, 0.1, 0.1, 0.1])
    net = FixedLogits(probs.log())
    tokens = torch.tensor([[1, 0, 0, 0]])
    corrupted = torch.tensor([[3, 3, 3, 3]])
    assert ar_loss(net, tokens, inputs=corrupted)["loss"].item() == pytest.approx(-math.log(0.7), rel=1e-6)


def test_bernoulli_masking_rate_matches_t():
    torch.manual_seed(0)
    t = torch.tensor([0.1, 0.5, 0.9])
    maskable = torch.ones(3, 20_000, dtype=torch.bool)
    mask, weight = mask_positions(t, maskable, "bernoulli")
    rates = mask.float().mean(dim=1)
    tolerance = 4 * torch.sqrt(t * (1 - t) / 20_000)
    assert torch.all((rates - t).abs() < tolerance)
    assert torch.allclose(weight, 1 / t)


def test_exact_masking_masks_ceil_nt_positions_and_weights_n_over_k():
    torch.manual_seed(0)
    t = torch.tensor([0.001, 0.26, 0.5, 1.0])
    maskable = maskable_positions(torch.zeros(4, 11, dtype=torch.long), shifted=True)  # 10 maskable positions
    mask, weight = mask_positions(t, maskable, "exact")
    k = torch.tensor([1, 3, 5, 10])
    assert torch.equal(mask.sum(dim=1), k)
    assert not mask[:, 0].any()  # the shifted anchor is never masked
    assert torch.allclose(weight, 10 / k.float())


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_time_samplers_follow_their_distribution(sampler):
    torch.manual_seed(1)
    eps = 1e-3
    if sampler.name in ("antithetic", "stratified"):
        t = torch.cat([sample_times(sampler.name, 64, eps, params=sampler.params)[0] for _ in range(200)])
    else:
        t = sample_times(sampler.name, 12_800, eps, params=sampler.params)[0]
    s = ((t - eps) / (1 - eps)).double().numpy()
    cdfs = {
        "beta": stats.beta(sampler.a, sampler.b).cdf,
        "logit_normal": lambda x: stats.norm(sampler.mu, sampler.sigma).cdf(stats.logistic.ppf(x)),
        "truncated_normal": stats.truncnorm((0 - sampler.mu) / sampler.sigma, (1 - sampler.mu) / sampler.sigma,
                                            loc=sampler.mu, scale=sampler.sigma).cdf,
    }
    assert stats.kstest(s, cdfs.get(sampler.name, stats.uniform.cdf)).pvalue > 1e-3


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_time_density_integrates_to_one_and_matches_samples(sampler):
    eps = 1e-3
    grid = torch.linspace(eps, 1, 200_001, dtype=torch.float64)[1:-1]
    density = time_density(sampler.name, grid.float(), eps, sampler.params).double()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=2e-3)
    t, pi = sample_times(sampler.name, 16, eps, params=sampler.params)
    assert torch.allclose(pi, time_density(sampler.name, t, eps, sampler.params), rtol=1e-4)


def test_antithetic_and_stratified_cover_every_stratum():
    torch.manual_seed(2)
    for name in ("antithetic", "stratified"):
        t = sample_times(name, 8, 0.0)[0]
        assert sorted((t * 8).floor().long().tolist()) == list(range(8))


def test_mdm_loss_uses_one_over_t_weight_on_masked_tokens():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])  # id 3 is the mask token
    net = FixedLogits(torch.log(probs.clamp(min=1e-30)))
    tokens = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]])
    torch.manual_seed(3)
    t = torch.tensor([0.5])
    out = mdm_loss(net, tokens, 3, shifted=False, t=t)
    torch.manual_seed(3)
    mask, _ = mask_positions(t, torch.ones_like(tokens, dtype=torch.bool), "bernoulli")
    nll = -torch.log(probs[tokens])
    expected = (nll * mask).sum() / 0.5 / tokens.numel()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mdm_loss_of_exact_context_free_model_is_the_entropy():
    """iid tokens from p, a model predicting p: the NELBO per token equals H(p) in expectation."""
    torch.manual_seed(4)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    net = FixedLogits(torch.cat([p.log(), torch.zeros(1)]))
    entropy = -(p * p.log()).sum().item()
    tokens = torch.multinomial(p, 4000 * 32, replacement=True).view(4000, 32)
    loss = mdm_loss(net, tokens, 4, shifted=False)["loss"].item()
    assert loss == pytest.approx(entropy, rel=0.03)


# Samplers whose importance weights 1/pi(t) have finite variance (int 1/pi dt < inf); for Beta(a >= 2 or b >= 2)
# and the logit-normal the estimator is still unbiased but heavy-tailed (the config warns about it).
FINITE_VARIANCE = [*SAMPLERS[:3], Sampler(name="beta", a=1.5, b=1.5),
                   Sampler(name="truncated_normal", mu=0.5, sigma=0.3)]


@pytest.mark.parametrize("sampler", FINITE_VARIANCE, ids=lambda s: f"{s.name}-{s.a}-{s.sigma}")
@pytest.mark.parametrize("masking", ["bernoulli", "exact"])
def test_elbo_weighting_keeps_the_expected_loss_unchanged_across_samplers(sampler, masking):
    k, q, length, eps = 8, 0.9, 6, 1e-3
    torch.manual_seed(5)
    net = CopyVisible(k, q)
    tokens = torch.randint(0, k, (20_000, 1)).expand(-1, length).contiguous()
    cfg = {"time_sampler": sampler.name, "sampler_params": sampler.params, "eps": eps, "masking": masking,
           "weighting": "elbo", "shifted": False}
    losses = torch.stack([mdm_loss(net, tokens[i::4], k, **cfg)["loss"] for i in range(4)])
    if masking == "bernoulli":
        expected = copy_visible_elbo(k, q, length, eps)
    else:  # k ~ U{1..n}: (n-1)/n of the time some token stays visible
        expected = ((length - 1) * -math.log(q) + math.log(k)) / length
    assert losses.mean().item() == pytest.approx(expected, rel=0.03)


def test_sampled_weighting_differs_from_the_elbo_under_a_bell_shaped_sampler():
    k, q, length, eps = 8, 0.9, 6, 1e-3
    torch.manual_seed(6)
    net = CopyVisible(k, q)
    tokens = torch.randint(0, k, (20_000, 1)).expand(-1, length).contiguous()
    sampler = Sampler(name="beta", a=5.0, b=1.0)  # mass near t=1, where the loss is high
    loss = mdm_loss(net, tokens, k, time_sampler=sampler.name, sampler_params=sampler.params, eps=eps,
                    weighting="sampled", shifted=False)["loss"].item()
    assert loss > 1.2 * copy_visible_elbo(k, q, length, eps)


def test_fixed_nelbo_estimator_is_deterministic_and_converges_to_the_elbo():
    k, q, length = 8, 0.9, 6
    net = CopyVisible(k, q)
    torch.manual_seed(7)
    tokens = torch.randint(0, k, (3000, 1)).expand(-1, length).contiguous()
    index = torch.arange(3000)
    per_seq, counts = nelbo_fixed(net, tokens, index, samples=4, mask_id=k, shifted=False)
    assert torch.all(counts == length)
    assert (per_seq.sum() / counts.sum()).item() == pytest.approx(copy_visible_elbo(k, q, length, 1e-3), rel=0.03)
    # same sequence index -> same estimate, whatever else is in the batch or its order
    again, _ = nelbo_fixed(net, tokens[[5, 2, 9]], index[[5, 2, 9]], samples=4, mask_id=k, shifted=False)
    assert torch.allclose(again, per_seq[[5, 2, 9]])


def test_hash_uniform_is_deterministic_and_uniform():
    keys = torch.arange(50_000)
    u = hash_uniform(3, keys)
    assert torch.equal(u, hash_uniform(3, keys))
    assert not torch.equal(u, hash_uniform(4, keys))
    assert stats.kstest(u.double().numpy(), stats.uniform.cdf).pvalue > 1e-3


def test_prefix_lm_mask_is_bidirectional_in_the_prefix_and_causal_after():
    mask = prefix_lm_mask(torch.tensor([3, 0]), 5)[:, 0]
    assert mask[0, 0, 2] and mask[0, 1, 2]  # inside the prefix every token sees every prefix token
    assert not mask[0, 1, 3] and mask[0, 4, 3]  # after it, attention is causal
    assert torch.equal(mask[1], torch.tril(torch.ones(5, 5, dtype=torch.bool)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cross_entropy_matches_fp32_values_and_gradients(dtype, monkeypatch):
    """bf16/fp16 logits go through the chunked fp32 reduction; values and gradients equal cross-entropy on an fp32
    copy (chunks smaller than the batch so the chunk boundaries are exercised, -inf logits as under SUBS)."""
    import workbench.diffusion as diffusion

    monkeypatch.setattr(diffusion, "CE_CHUNK_ROWS", 7)
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 10, 50, generator=generator)).to(dtype)
    logits[..., 4] = float("-inf")  # a SUBS-style forbidden word
    targets = torch.randint(0, 50, (3, 10), generator=generator)
    targets[targets == 4] = 5
    weights = torch.rand(3, 10, generator=generator)

    low = logits.clone().requires_grad_(True)
    nll = token_nll(low, targets)
    (nll * weights).sum().backward()
    reference = logits.float().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(reference.flatten(0, 1), targets.flatten(), reduction="none")
    (expected.view(3, 10) * weights).sum().backward()

    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, expected.view(3, 10).detach(), rtol=0, atol=1e-5)
    assert low.grad.dtype == dtype
    torch.testing.assert_close(low.grad.float(), reference.grad.to(dtype).float(), rtol=0, atol=1e-2)
    assert torch.all(low.grad[..., 4] == 0)


# ---------------------------------------------------------------------------------------------------------------
# issue 11, section 2: exact-count masking's times, z-loss under SUBS, hashed uniforms, Beta generator


class CountMasks(torch.nn.Module):
    """Records how many positions of each row are masked; predicts uniformly."""

    def __init__(self, vocab: int, mask_id: int):
        super().__init__()
        self.vocab, self.mask_id, self.counts = vocab, mask_id, []

    def forward(self, input_ids, causal=False, attn_mask=None, zero_embed=None):
        self.counts.append((input_ids == self.mask_id).sum(dim=1))
        return torch.zeros(*input_ids.shape, self.vocab)


@pytest.mark.parametrize("sampler", ["uniform", "stratified"])
def test_exact_masking_draws_every_count_uniformly_whatever_eps(sampler):
    """k = ceil(n t) with t on (0, 1): uniform on {1..n}. With t on [eps, 1] and n * eps >= 1 (here 8 * 0.2), k = 1
    was never drawn."""
    torch.manual_seed(8)
    n, draws = 8, 80_000
    net = CountMasks(vocab=4, mask_id=3)
    mdm_loss(net, torch.zeros(draws, n, dtype=torch.long), 3, time_sampler=sampler, eps=0.2, masking="exact",
             shifted=False)
    frequencies = torch.bincount(net.counts[0], minlength=n + 1).double() / draws
    assert frequencies[0] == 0
    sigma = math.sqrt((1 / n) * (1 - 1 / n) / draws)
    assert torch.all((frequencies[1:] - 1 / n).abs() < 4 * sigma), frequencies


def test_mdm_z_loss_normalises_over_the_real_vocabulary_when_the_mask_id_is_not_last():
    """The trained BPE tokenizer's mask id is 1: the z-loss is logsumexp over every id but the mask, squared (the
    SUBS -inf drops out), not over the ids below the mask id."""
    from workbench.objectives import MDMObjective

    mask_id = 1
    logits = torch.tensor([0.5, 3.0, 2.0, -1.0, 1.5, 0.0])
    net = FixedLogits(logits)
    tokens = torch.tensor([[0, 2, 3, 4, 5, 0, 2, 3]] * 4)
    torch.manual_seed(9)
    plain = MDMObjective(mask_id, shifted=False)(net, {"tokens": tokens})["loss"]
    torch.manual_seed(9)
    with_z = MDMObjective(mask_id, z_loss=0.5, shifted=False)(net, {"tokens": tokens})["loss"]
    real = torch.cat([logits[:mask_id], logits[mask_id + 1:]])
    expected = torch.logsumexp(real, dim=0).item() ** 2
    assert (with_z - plain).item() == pytest.approx(0.5 * expected, rel=1e-5)
    assert expected > 2 * logits[0].item() ** 2  # the slice [:mask_id] (EOS's logit alone) is far off


def test_hashed_uniforms_never_reach_one():
    """Key 3130929609 hashes to the largest 32-bit state, 2^32 - 1, which float32 rounded to exactly 1.0."""
    key = 3130929609
    value = hash_uniform(key)
    assert 0.0 <= value.item() < 1.0
    assert value.item() == pytest.approx(1.0, abs=1e-7)  # the clamp keeps it the nearest value below 1
    others = hash_uniform(torch.arange(key - 1000, key + 1000))
    assert others.max().item() < 1.0 and others.min().item() >= 0.0


def test_every_time_sampler_honours_its_generator():
    for sampler in SAMPLERS:
        draws = [sample_times(sampler.name, 16, 1e-3, generator=torch.Generator().manual_seed(5),
                              params=sampler.params)[0] for _ in range(2)]
        torch.manual_seed(0)  # the global stream must play no part
        again = sample_times(sampler.name, 16, 1e-3, generator=torch.Generator().manual_seed(5),
                             params=sampler.params)[0]
        assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], again), sampler.name
