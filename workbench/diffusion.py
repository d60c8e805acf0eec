"""Masked (absorbing-state) diffusion: time samplers, masking, the training loss and a fixed NELBO estimator.

The objective is MDLM's continuous-time NELBO with the linear schedule alpha_t = 1 - t (Sahoo et al. 2024,
eq. 10): -log p(x) <= E_{t~U(0,1)} E_{x_t~q(.|x, t)} [ (1/t) * sum_{i: x_t^i = MASK} -log p_theta(x^i | x_t) ].

Convention (MDLM's, used by training, validation and MC-ELBO scoring): NELBO = E_{t~U(eps,1)}[(1/t) sum_masked -log p],
i.e. the integral over [eps, 1] divided by (1 - eps); exact-count masking uses eps = 0 (t on (0, 1)).
It bounds -log p_theta(x) only at eps = 0: with eps > 0 it is the truncated-integral estimate MDLM reports,
which can fall below -log p_theta(x) for single sequences (by ~1e-3 nats at eps = 1e-3 on an enumerable toy).

Exact-count masking (k = ceil(n t) of n positions) gives the discrete any-order form with weight n/k
(Ou et al. 2024, RADD eq. 7; Nie et al. 2024, SMDM); k >= 1 already bounds the weight, so it needs no eps and
k is uniform on {1..n} under uniform t. A non-uniform time density pi(t) is importance-corrected (``elbo``
weighting: weight * u(t) / pi(t), u the uniform density on [eps, 1]) so the loss stays an unbiased estimate of
the same NELBO, or used as-is (``sampled``: weight 1/t or n/k at t ~ pi, equal to ``elbo`` for uniform samplers).
Unbiased is not low-variance: logit-normal and Beta(a >= 2 or b >= 2) densities vanish at the ends of (0, 1),
so their ``elbo`` weights have infinite variance and the estimate converges very slowly (config warns about it).
The functional forms take plain arguments (sampler name and parameters, rates, ids), not config dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

SAMPLERS = ("uniform", "antithetic", "stratified", "beta", "logit_normal", "truncated_normal")
UNIFORM_SAMPLERS = ("uniform", "antithetic", "stratified")  # marginally uniform t: density 1 / (1 - eps)
SAMPLER_DEFAULTS: dict[str, float] = {"a": 2.0, "b": 2.0, "mu": 0.0, "sigma": 1.0}  # Beta a, b; normal mu, sigma

# --------------------------------------------------------------------------------------------------------------
# time samplers: each returns t in [eps, 1] per sequence and the density pi(t) it was drawn from. A sampler is a
# name (SAMPLERS) and its parameters (a, b for beta; mu, sigma for logit_normal and truncated_normal).


def _params(params: Mapping[str, float] | None) -> dict[str, float]:
    merged = {**SAMPLER_DEFAULTS, **(params or {})}
    unknown = set(merged) - set(SAMPLER_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown time sampler parameter(s) {sorted(unknown)}; allowed: a, b, mu, sigma")
    return merged


def _base_density(name: str, s: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    """Density on (0, 1) of the sampler's base variable s (before the affine map to [eps, 1])."""
    if name in UNIFORM_SAMPLERS:
        return torch.ones_like(s)
    if name == "beta":
        a, b = p["a"], p["b"]
        log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
        return torch.exp((a - 1) * torch.log(s) + (b - 1) * torch.log1p(-s) - log_beta)
    mu, sigma = p["mu"], p["sigma"]
    if name == "logit_normal":  # s = sigmoid(mu + sigma z): N(logit s; mu, sigma) / (s (1 - s))
        z = (torch.logit(s) - mu) / sigma
        return torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi) * s * (1 - s))
    if name == "truncated_normal":  # N(mu, sigma) restricted to [0, 1] and renormalised
        mass = _ndtr((1 - mu) / sigma) - _ndtr(-mu / sigma)
        z = (s - mu) / sigma
        return torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi) * mass)
    raise ValueError(f"unknown time sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def _ndtr(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _sample_base(name: str, n: int, device, generator: torch.Generator | None, p: dict[str, float]
                 ) -> torch.Tensor:
    def rand(*shape):
        return torch.rand(*shape, device=device, generator=generator)

    if name == "uniform":
        return rand(n)
    if name == "antithetic":  # MDLM's low-discrepancy sampler: evenly spaced with one random offset
        return (rand(1) + torch.arange(n, device=device) / n) % 1.0
    if name == "stratified":
        return (torch.arange(n, device=device) + rand(n)) / n
    if name == "beta":
        gamma_a = torch._standard_gamma(torch.full((n,), float(p["a"]), device=device), generator=generator)
        gamma_b = torch._standard_gamma(torch.full((n,), float(p["b"]), device=device), generator=generator)
        return gamma_a / (gamma_a + gamma_b)
    mu, sigma = p["mu"], p["sigma"]
    if name == "logit_normal":
        return torch.sigmoid(mu + sigma * torch.randn(n, device=device, generator=generator))
    if name == "truncated_normal":  # inverse CDF on the truncated interval
        lo, hi = _ndtr(-mu / sigma), _ndtr((1 - mu) / sigma)
        return mu + sigma * torch.special.ndtri(lo + (hi - lo) * rand(n))
    raise ValueError(f"unknown time sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def sample_times(sampler: str, n: int, eps: float, device="cpu", generator: torch.Generator | None = None,
                 params: Mapping[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n diffusion times t = eps + (1 - eps) s, s ~ sampler, and their density pi(t) on [eps, 1]."""
    p = _params(params)
    tiny = torch.finfo(torch.float32).eps
    s = _sample_base(sampler, n, device, generator, p).clamp(tiny, 1 - tiny)
    t = eps + (1 - eps) * s
    return t, _base_density(sampler, s, p) / (1 - eps)


def time_density(sampler: str, t: torch.Tensor, eps: float, params: Mapping[str, float] | None = None
                 ) -> torch.Tensor:
    """pi(t) of :func:`sample_times` evaluated at given t in (eps, 1)."""
    return _base_density(sampler, (t - eps) / (1 - eps), _params(params)) / (1 - eps)


# --------------------------------------------------------------------------------------------------------------
# masking


def mask_positions(t: torch.Tensor, maskable: torch.Tensor, mode: str = "bernoulli",
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to mask, per sequence at rate t.

    ``bernoulli``: each maskable position independently with probability t. ``exact``: exactly
    k = clamp(ceil(n t), 1, n) of the n maskable positions. Returns (mask (B, L) bool, per-sequence weight):
    1/t for bernoulli, n/k for exact (the ELBO weight before any time-density correction).
    ``noise`` (B, L) in [0, 1) replaces fresh uniform noise (used by the fixed estimators)."""
    if noise is None:
        noise = torch.rand(maskable.shape, device=maskable.device)
    if mode == "bernoulli":
        return (noise < t[:, None]) & maskable, 1.0 / t
    if mode == "exact":
        n = maskable.sum(dim=1)
        k = torch.clamp(torch.ceil(n * t), min=1).minimum(n.clamp(min=1))
        scores = noise.masked_fill(~maskable, 2.0)  # unmaskable positions rank last
        ranks = scores.argsort(dim=1).argsort(dim=1)
        return (ranks < k[:, None]) & maskable, n.clamp(min=1) / k
    raise ValueError(f"unknown masking mode {mode!r}; allowed: bernoulli, exact")


def maskable_positions(tokens: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Positions that may be masked: all, except position 0 under the shifted parameterisation (nothing
    predicts it, it is the always-visible anchor)."""
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    if shifted:
        maskable[:, 0] = False
    return maskable


# --------------------------------------------------------------------------------------------------------------
# the loss


CE_CHUNK_ROWS = 4096  # rows of logits upcast to fp32 at a time by the low-precision cross-entropy


class _LowPrecisionCrossEntropy(torch.autograd.Function):
    """Per-row NLL of bf16/fp16 logits computed in fp32, without an fp32 copy of the whole logits tensor.

    ``F.cross_entropy(logits.float())`` keeps a (rows, vocab) fp32 tensor alive for backward (6.6 GB for a batch of
    32 x 1024 tokens over 50k words). Here the forward upcasts ``CE_CHUNK_ROWS`` rows at a time and saves only the
    low-precision logits and each row's log-sum-exp; the backward recomputes softmax(logits) - onehot(target) per
    chunk and writes the gradient in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):  # a few chunks per batch, not a loop over tokens
            lse[start:start + CE_CHUNK_ROWS] = torch.logsumexp(logits[start:start + CE_CHUNK_ROWS].float(), dim=-1)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return lse - target_logits

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
            end = start + CE_CHUNK_ROWS
            probs = torch.exp(logits[start:end].float() - lse[start:end, None])  # softmax, d nll / d logits + onehot
            probs.scatter_add_(1, targets[start:end, None], torch.full_like(probs[:, :1], -1.0))
            grad[start:end] = (probs * grad_nll[start:end, None].float()).to(grad.dtype)
        return grad, None


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood in fp32, shape of ``targets`` (low-precision logits are reduced in
    fp32 chunk by chunk, see :class:`_LowPrecisionCrossEntropy`)."""
    flat_logits, flat_targets = logits.flatten(0, -2), targets.flatten()
    if flat_logits.dtype in (torch.bfloat16, torch.float16):
        nll = _LowPrecisionCrossEntropy.apply(flat_logits, flat_targets)
    else:
        nll = F.cross_entropy(flat_logits.float(), flat_targets, reduction="none")
    return nll.view(targets.shape)


def masked_predictions(net, x_t: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, mask_id: int,
                       shifted: bool, subs: bool, attn_mask: torch.Tensor | None = None):
    """Run the denoiser bidirectionally on x_t; return (nll, loss_mask, logits) aligned on predicted tokens.

    Unshifted: position i predicts x^i. Shifted: position i predicts x^{i+1} (one head serves AR and MDM).
    SUBS (MDLM sec. 3.2): the mask token's logit is -inf and unmasked positions carry no loss."""
    logits = net(x_t, causal=False, attn_mask=attn_mask)
    if subs:
        logits[..., mask_id] = float("-inf")
    if shifted:
        logits, targets, loss_mask = logits[:, :-1], tokens[:, 1:], mask[:, 1:]
    else:
        targets, loss_mask = tokens, mask
    return token_nll(logits, targets), loss_mask, logits


def mdm_loss(net, tokens: torch.Tensor, mask_id: int, *, time_sampler: str = "uniform",
             sampler_params: Mapping[str, float] | None = None, eps: float = 1e-3, weighting: str = "elbo",
             masking: str = "bernoulli", subs: bool = True, shifted: bool = False,
             t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MDLM training loss, in nats per predicted token (an unbiased estimate of the NELBO of the module
    docstring with ``elbo`` weighting, for every time sampler):

        loss = sum_b w_b * sum_{i masked in b} -log p(x_b^i | x_t,b)  /  sum_b n_b
        w_b  = 1/t_b (bernoulli) or n_b/k_b (exact), times u(t_b)/pi(t_b) under ``elbo`` weighting, where
               u = 1/(1 - eps) is the uniform density on [eps, 1] and pi the sampler's density there.

    Bernoulli masking draws t on [eps, 1]; exact-count masking on (0, 1) (eps = 0: k is uniform on {1..n} under
    the uniform sampler, never bounded away from 1). A given ``t`` is used as-is with weight 1/t or n/k."""
    if weighting not in ("elbo", "sampled"):
        raise ValueError(f"unknown weighting {weighting!r}; allowed: elbo, sampled")
    batch = tokens.shape[0]
    importance = None
    if t is None:
        t_min = eps if masking == "bernoulli" else 0.0
        t, pi_t = sample_times(time_sampler, batch, t_min, tokens.device, params=sampler_params)
        if weighting == "elbo" and time_sampler not in UNIFORM_SAMPLERS:  # uniform ones: u / pi = 1 exactly
            importance = 1.0 / ((1 - t_min) * pi_t)  # E_{t~pi}[f(t) u(t)/pi(t)] = E_{t~U(t_min, 1)}[f(t)]
    maskable = maskable_positions(tokens, shifted)
    mask, weight = mask_positions(t, maskable, masking)
    x_t = tokens.masked_fill(mask, mask_id)
    nll, loss_mask, logits = masked_predictions(net, x_t, mask, tokens, mask_id, shifted, subs)
    if importance is not None:
        weight = weight * importance
    per_sequence = (nll * loss_mask).sum(dim=1)
    loss = (weight * per_sequence).sum() / maskable.sum()
    return {"loss": loss, "logits": logits, "loss_mask": loss_mask, "mask_rate": mask.float().mean()}


# --------------------------------------------------------------------------------------------------------------
# a fixed estimator for validation: identical masks for every run, batch size and order


_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


def hash_uniform(*keys: torch.Tensor | int) -> torch.Tensor:
    """Deterministic uniform [0, 1) noise from integer keys (broadcast), identical on CPU and GPU."""

    def mix(x: torch.Tensor) -> torch.Tensor:  # 32-bit integer finaliser (Mueller's hash), in int64 without overflow
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        return (x >> 16) ^ x

    state = None
    for i, key in enumerate(keys):
        key_t = torch.as_tensor(key, dtype=torch.int64)
        value = mix((key_t + 0x9E3779B9 * (i + 1)) & 0xFFFFFFFF)
        state = value if state is None else mix(state ^ value)
    assert state is not None
    # state / 2^32 < 1 in float64, but float32 rounds the top 128 states to 1.0: keep those just below 1 (every
    # other value is unchanged, so item subsets and validation masks stay what they were)
    return state.to(torch.float64).div(2**32).float().clamp(max=_BELOW_ONE)


@torch.no_grad()
def nelbo_fixed(net, tokens: torch.Tensor, index: torch.Tensor, samples: int, mask_id: int, shifted: bool,
                subs: bool = True, eps: float = 1e-3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence NELBO (sum over tokens, nats) with K stratified times and hashed masks, and token counts.

    t_k = eps + (1 - eps) (k + u_k) / K with u_k hashed from (seed, sequence index, k): stratified, unbiased
    for each sequence, and identical across runs, batch sizes and orders, so curves of different runs are
    comparable. One forward pass of B rows per k."""
    length = tokens.shape[1]
    device = tokens.device
    seq = index.to(device).long()
    positions = torch.arange(length, device=device)
    maskable = maskable_positions(tokens, shifted)
    total = torch.zeros(tokens.shape[0], device=device)
    for k in range(samples):
        offset = hash_uniform(seed, seq, k).to(device)
        t = eps + (1 - eps) * (k + offset) / samples
        noise = hash_uniform(seed + 1, seq[:, None], k, positions[None, :]).to(device)
        mask, weight = mask_positions(t, maskable, "bernoulli", noise)
        nll, loss_mask, _ = masked_predictions(net, tokens.masked_fill(mask, mask_id), mask, tokens, mask_id,
                                               shifted, subs)
        total += weight * (nll * loss_mask).sum(dim=1)
    return total / samples, maskable.sum(dim=1).float()
