"""The scorers and samplers on toy networks whose probabilities are known in closed form.

Toy nets follow the Transformer's call signature ``net(x, causal, attn_mask) -> logits (B, L, W)``; the logits
are W = 32 wide over a real vocabulary of 20 ids (the rest is padding, as in the model), id 19 is the mask.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from workbench.diffusion import masked_predictions
from workbench.evaluation.generate import draw, filter_logits, generative_perplexity, sample_ar, sample_mdm
from workbench.evaluation.scoring import (
    Rows,
    choose,
    resolve_scorer,
    score_ar,
    score_batch,
    score_chain,
    score_mc_elbo,
    score_pll,
    view_logprobs,
)

VOCAB, WIDTH, MASK, EOS, PAD = 20, 32, 19, 0, 1


class ContextFree(nn.Module):
    """Ignores its input: every position has logits ``w``."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x, causal=True, attn_mask=None, zero_embed=None):
        return self.w.expand(*x.shape, -1).clone()


class MaskCount(nn.Module):
    """Logits a + b * (number of mask tokens in the row): predictions depend on how much is masked, so the
    diffusion ELBO differs from the log-likelihood, but stay closed-form."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, causal=True, attn_mask=None, zero_embed=None):
        k = (x == MASK).sum(dim=1, keepdim=True).float()
        return (self.a + self.b * k[..., None]).expand(*x.shape, -1).clone()


class Neighbours(nn.Module):
    """logits_i = T[x_{i+shift}] (+ U[x_{i+1}]): ``shift`` 0 is a shifted bigram (position i predicts i+1 from
    x_i), -1 an unshifted left bigram; ``right`` adds the right neighbour (PAD beyond the row)."""

    def __init__(self, table: torch.Tensor, shift: int, right: torch.Tensor | None = None):
        super().__init__()
        self.table, self.shift, self.right = table, shift, right

    def forward(self, x, causal=True, attn_mask=None, zero_embed=None):
        left = x if self.shift == 0 else torch.cat([torch.full_like(x[:, :1], EOS), x[:, :-1]], dim=1)
        logits = self.table[left]
        if self.right is not None:
            logits = logits + self.right[torch.cat([x[:, 1:], torch.full_like(x[:, :1], PAD)], dim=1)]
        return logits


def _logsoftmax(logits: torch.Tensor, subs: bool) -> torch.Tensor:
    logits = logits.double().clone()
    if subs:
        logits[..., MASK] = float("-inf")
    return logits.log_softmax(dim=-1)


def _rows(seed: int = 0, n: int = 5, keys: list[int] | None = None) -> tuple[list[list[int]], list[int], Rows]:
    generator = torch.Generator().manual_seed(seed)
    rows, starts = [], []
    for _ in range(n):
        ctx = torch.randint(2, MASK, (int(torch.randint(0, 5, (1,), generator=generator)),), generator=generator)
        cont = torch.randint(2, MASK, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator)
        rows.append([EOS, *ctx.tolist(), *cont.tolist()])
        starts.append(1 + len(ctx))
    return rows, starts, Rows.from_lists(rows, starts, keys, pad_id=PAD)


def _random(*shape, seed=0, scale=2.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MDM = {"mask_id": MASK, "vocab_size": VOCAB}


# --------------------------------------------------------------------------------------------------------------
# exact scorers


def test_ar_scorer_is_exact_on_a_bigram_model():
    table = _random(WIDTH, WIDTH, seed=1)
    net = Neighbours(table, shift=0)
    rows, starts, batch = _rows(seed=2, n=6)
    greedy_row = [EOS, 5]  # continue with the argmax path so one row is a greedy match
    for _ in range(3):
        greedy_row.append(int(table[greedy_row[-1], :VOCAB].argmax()))
    rows.append(greedy_row)
    starts.append(2)
    batch = Rows.from_lists(rows, starts, pad_id=PAD)
    scores = score_ar(net, batch, vocab_size=VOCAB, rows_per_forward=4)
    for r, (row, start) in enumerate(zip(rows, starts)):
        logp = _logsoftmax(table, subs=False)
        exact = sum(float(logp[row[j - 1], row[j]]) for j in range(start, len(row)))
        assert float(scores.logprob[r]) == pytest.approx(exact, abs=1e-4)
        is_greedy = all(int(table[row[j - 1], :VOCAB].argmax()) == row[j] for j in range(start, len(row)))
        assert bool(scores.greedy[r]) == is_greedy
    assert bool(scores.greedy[-1]) and scores.stderr.abs().max() == 0


@pytest.mark.parametrize("shifted", [True, False])
def test_chain_rule_is_exact_for_left_to_right_models(shifted):
    table = _random(WIDTH, WIDTH, seed=3)
    net = Neighbours(table, shift=0 if shifted else -1)
    rows, starts, batch = _rows(seed=4, n=7)
    scores = score_chain(net, batch, shifted=shifted, subs=True, rows_per_forward=5, **MDM)
    logp = _logsoftmax(table, subs=True)
    for r, (row, start) in enumerate(zip(rows, starts)):
        exact = sum(float(logp[row[j - 1], row[j]]) for j in range(start, len(row)))
        assert float(scores.logprob[r]) == pytest.approx(exact, abs=1e-4)
    if shifted:  # the shifted model's chain rule is its AR likelihood (up to SUBS's exclusion of the mask id)
        ar = score_ar(net, batch, vocab_size=VOCAB)
        table_no_mask = table.clone()
        table_no_mask[:, MASK] = -1e9
        assert torch.allclose(score_ar(Neighbours(table_no_mask, 0), batch, vocab_size=VOCAB).logprob,
                              scores.logprob, atol=1e-4)
        assert not torch.allclose(ar.logprob, scores.logprob, atol=1e-3)


def test_pseudo_log_likelihood_matches_its_closed_form():
    left, right = _random(WIDTH, WIDTH, seed=5), _random(WIDTH, WIDTH, seed=6)
    net = Neighbours(left, shift=-1, right=right)
    rows, starts, batch = _rows(seed=7, n=6)
    scores = score_pll(net, batch, shifted=False, subs=True, rows_per_forward=4, **MDM)
    for r, (row, start) in enumerate(zip(rows, starts)):
        padded = [*row, PAD]
        exact = 0.0
        for j in range(start, len(row)):  # only x_j masked: both neighbours visible
            exact += float(_logsoftmax(left[padded[j - 1]] + right[padded[j + 1]], subs=True)[row[j]])
        assert float(scores.logprob[r]) == pytest.approx(exact, abs=1e-4)
    chain = score_chain(net, batch, shifted=False, subs=True, **MDM)
    assert not torch.allclose(chain.logprob, scores.logprob, atol=1e-3)  # chain masks the right neighbours


def test_classifier_free_guidance_matches_its_closed_form():
    table = _random(WIDTH, WIDTH, seed=8)
    net = Neighbours(table, shift=-1)
    rows, starts, batch = _rows(seed=9, n=6)
    w = 1.5
    scores = score_chain(net, batch, shifted=False, subs=True, cfg_weight=w, rows_per_forward=6, **MDM)
    for r, (row, start) in enumerate(zip(rows, starts)):
        exact = 0.0
        for j in range(start, len(row)):
            cond = table[row[j - 1]]
            # unconditional pass: context tokens (1 .. start-1) masked; EOS and the unmasked continuation stay
            uncond = table[MASK if 1 <= j - 1 < start else row[j - 1]]
            exact += float(_logsoftmax(uncond + (w + 1) * (cond - uncond), subs=True)[row[j]])
        assert float(scores.logprob[r]) == pytest.approx(exact, abs=1e-4)
    plain = score_chain(net, batch, shifted=False, subs=True, **MDM)
    assert torch.equal(score_chain(net, batch, shifted=False, subs=True, cfg_weight=0.0, **MDM).logprob,
                       plain.logprob)
    assert not torch.allclose(plain.logprob, scores.logprob, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# the Monte Carlo ELBO


def test_every_scorer_is_exact_for_a_context_free_model():
    """Without context dependence the ELBO is the log-likelihood: the MC estimate must scatter around it."""
    w = _random(WIDTH, seed=10)
    net = ContextFree(w)
    rows, starts, batch = _rows(seed=11, n=6)
    logp = _logsoftmax(w, subs=True)
    exact = torch.tensor([sum(float(logp[t]) for t in row[s:]) for row, s in zip(rows, starts)], dtype=torch.float64)
    for scorer in (score_chain, score_pll):
        assert torch.allclose(scorer(net, batch, shifted=False, subs=True, **MDM).logprob, exact, atol=1e-4)
    assert torch.allclose(score_ar(net, batch, vocab_size=VOCAB).logprob,
                          torch.tensor([sum(float(_logsoftmax(w, False)[t]) for t in row[s:])
                                        for row, s in zip(rows, starts)], dtype=torch.float64), atol=1e-4)
    for masking in ("exact", "bernoulli"):
        mc = score_mc_elbo(net, batch, shifted=False, samples=256, masking=masking, rows_per_forward=128, **MDM)
        multi = batch.cont_len > 1
        assert (mc.stderr[multi] > 0).all()
        assert ((mc.logprob - exact).abs() <= 4 * mc.stderr + 1e-6).all(), masking
    single = score_mc_elbo(net, batch, shifted=False, samples=64, masking="exact", **MDM)
    assert torch.allclose(single.logprob[batch.cont_len == 1], exact[batch.cont_len == 1])  # l = n = 1: exact


def _mask_count_elbo(a, b, cont: list[int], masking: str, eps: float = 1e-3) -> float:
    """Closed-form ELBO of the MaskCount net: with S(l) = sum_i log p(x_i | l masked), exact masking gives
    mean_l S(l); bernoulli gives int_eps^1 (1/t) sum_l Binom(l; n, t) (l/n) S(l) dt / (1 - eps)."""
    n = len(cont)
    s = [sum(float(_logsoftmax(a + b * k, subs=True)[x]) for x in cont) for k in range(n + 1)]
    if masking == "exact":
        return sum(s[1:]) / n
    t = torch.linspace(eps, 1.0, 200001, dtype=torch.float64)
    integrand = sum(math.comb(n, k) * t ** (k - 1) * (1 - t) ** (n - k) * (k / n) * s[k] for k in range(1, n + 1))
    return float(torch.trapezoid(integrand, t)) / (1 - eps)


@pytest.mark.parametrize("masking", ["exact", "bernoulli"])
def test_mc_elbo_is_an_unbiased_estimate_of_the_elbo(masking):
    a, b = _random(WIDTH, seed=12), _random(WIDTH, seed=13, scale=0.8)
    net = MaskCount(a, b)
    rows = [[EOS, 4, 5, 6, 7, 8, 9, 10], [EOS, 3, 11, 12, 13, 14, 15]]
    starts = [2, 1]
    batch = Rows.from_lists(rows, starts, pad_id=PAD)
    elbo = torch.tensor([_mask_count_elbo(a, b, row[s:], masking) for row, s in zip(rows, starts)])
    exact_ll = torch.tensor([sum(float(_logsoftmax(a + b, subs=True)[x]) for x in row[s:])  # one masked at a time
                             for row, s in zip(rows, starts)])
    big = score_mc_elbo(net, batch, shifted=False, samples=4096, masking=masking, rows_per_forward=2048, **MDM)
    assert ((big.logprob - elbo).abs() <= 4 * big.stderr).all(), (big.logprob, elbo, big.stderr)
    assert ((big.logprob - exact_ll).abs() > 10 * big.stderr).all()  # the test can tell the ELBO from other values
    estimates, errors = [], []
    for seed in range(30):  # independent estimators: mean converges, reported SE covers the spread
        est = score_mc_elbo(net, batch, shifted=False, samples=32, masking=masking, seed=seed, **MDM)
        estimates.append(est.logprob)
        errors.append(est.stderr)
    estimates, errors = torch.stack(estimates), torch.stack(errors)
    spread = estimates.std(dim=0)
    assert ((estimates.mean(dim=0) - elbo).abs() <= 4 * spread / math.sqrt(30)).all()
    assert (spread <= 1.5 * errors.mean(dim=0)).all()  # SE is not optimistic (stratification makes it conservative)


def test_mc_elbo_noise_is_fixed_shared_across_choices_and_chunking_free():
    net = MaskCount(_random(WIDTH, seed=14), _random(WIDTH, seed=15, scale=0.5))
    cont = [7, 8, 9, 10, 11]
    rows = [[EOS, 2, 3, *cont], [EOS, 4, *cont], [EOS, 5, 6, *cont]]  # schema task: one continuation, 3 contexts
    same_item = Rows.from_lists(rows, [3, 2, 3], keys=[42, 42, 43], pad_id=PAD)
    kwargs = {"shifted": False, "samples": 16, "seed": 3, **MDM}
    first = score_mc_elbo(net, same_item, rows_per_forward=5, **kwargs)
    assert first.logprob[0] == first.logprob[1] != first.logprob[2]  # common random numbers within an item
    again = score_mc_elbo(net, same_item, rows_per_forward=1000, **kwargs)
    assert torch.allclose(first.logprob, again.logprob, atol=1e-9) and torch.equal(first.stderr, again.stderr)
    alone = score_mc_elbo(net, Rows.from_lists(rows[2:], [3], keys=[43], pad_id=PAD), **kwargs)
    assert torch.allclose(alone.logprob, first.logprob[2:], atol=1e-9)  # independent of batch composition
    other_seed = score_mc_elbo(net, same_item, **{**kwargs, "seed": 4})
    assert not torch.allclose(other_seed.logprob, first.logprob)


# --------------------------------------------------------------------------------------------------------------
# the real model path


def _tiny_transformer(seed: int = 0):
    from workbench.model import Transformer, TransformerConfig

    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=VOCAB, max_seq_len=32, n_layers=2, d_model=32, n_heads=2,
                                         init_std=0.2)).eval()


@pytest.mark.parametrize("shifted", [False, True])
def test_views_agree_with_the_training_estimator_path(shifted):
    net = _tiny_transformer(1)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, MASK, (4, 12), generator=generator)
    tokens[:, 0] = EOS
    rows = Rows(tokens, torch.full((4,), 12), torch.tensor([3, 5, 1, 8]), torch.arange(4))
    mask = (torch.rand(4, 12, generator=generator) < 0.5) & rows.cont_mask()
    mask[:, 11] = True
    with torch.no_grad():
        logp, _ = view_logprobs(net, rows, torch.arange(4), mask, mask, causal=False, shifted=shifted, subs=True,
                                **MDM)
        nll, loss_mask, _ = masked_predictions(net, tokens.masked_fill(mask, MASK), mask, tokens, MASK, shifted, True)
    assert torch.allclose(logp.float(), -(nll * loss_mask).sum(dim=1), atol=1e-4)


@pytest.mark.parametrize("prefix", [False, True])
def test_ar_scorer_matches_the_training_loss(prefix):
    """The ar scorer is the AR (or prefix-LM) training loss restricted to the continuation."""
    from workbench.objectives import ar_loss, prefix_lm_loss

    net = _tiny_transformer(3)
    tokens = torch.randint(2, MASK, (3, 14), generator=torch.Generator().manual_seed(1))
    starts = torch.tensor([4, 9, 1])
    rows = Rows(tokens, torch.full((3,), 14), starts, torch.arange(3))
    with torch.no_grad():
        scored = score_ar(net, rows, vocab_size=VOCAB, prefix=prefix).logprob
        for r in range(3):
            one = tokens[r:r + 1]
            if prefix:
                loss = prefix_lm_loss(net, one, starts[r:r + 1])
            else:
                loss = ar_loss(net, one, loss_mask=torch.arange(14)[None, :] >= starts[r])
            assert float(scored[r]) == pytest.approx(-float(loss["nll_sum"]), abs=1e-4)
        assert not torch.allclose(scored, score_ar(net, rows, vocab_size=VOCAB, prefix=not prefix).logprob)


@pytest.mark.parametrize("scorer", ["ar", "mc-elbo", "chain", "pll"])
def test_padding_chunking_and_the_selective_head_do_not_change_scores(scorer):
    net = _tiny_transformer(2)
    rows, starts, batch = _rows(seed=16, n=6)

    def run(the_net, the_rows, per_forward):
        with torch.no_grad():
            if scorer == "ar":
                return score_ar(the_net, the_rows, vocab_size=VOCAB, rows_per_forward=per_forward).logprob
            options = {"shifted": False, "subs": True, "rows_per_forward": per_forward, **MDM}
            if scorer == "mc-elbo":
                return score_mc_elbo(the_net, the_rows, samples=8, **options).logprob
            return (score_chain if scorer == "chain" else score_pll)(the_net, the_rows, **options).logprob

    together = run(net, batch, 64)
    alone = torch.cat([run(net, Rows.from_lists([row], [start], [key], pad_id=PAD), 64)
                       for key, (row, start) in enumerate(zip(rows, starts))])
    assert torch.allclose(together, alone, atol=1e-4)  # pads are invisible (key-padding mask / causal)
    assert torch.allclose(together, run(net, batch, 3), atol=1e-4)

    def full_logits(x, causal=True, attn_mask=None):  # no hidden_states/head: the full-logits path
        return net(x, causal=causal, attn_mask=attn_mask)

    assert torch.allclose(together, run(full_logits, batch, 64), atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# the Composer entry point: choices, ties, chance and a perfect model


class ToyLM(nn.Module):
    """The attributes score_batch reads from a WorkbenchLM."""

    def __init__(self, net, objective: str, shifted: bool, vocab_size: int, mask_id: int, eos_id: int = EOS):
        super().__init__()
        self.net = net
        self.objective = SimpleNamespace(name=objective)
        self.shifted, self.subs, self.vocab_size, self.mask_id, self.eos_id = shifted, True, vocab_size, mask_id, eos_id


def test_resolve_scorer_and_refusals():
    assert resolve_scorer("auto", "ar", True) == "ar" and resolve_scorer("auto", "dual", True) == "ar"
    assert resolve_scorer("auto", "prefix_lm", True) == "ar" and resolve_scorer("auto", "mdm", False) == "mc-elbo"
    assert resolve_scorer("chain", "dual", True) == "chain"
    with pytest.raises(ValueError, match="needs a masked-diffusion model"):
        resolve_scorer("mc-elbo", "ar", True)
    with pytest.raises(ValueError, match="needs a model trained with next-token prediction"):
        resolve_scorer("ar", "mdm", False)


def test_ties_are_broken_by_the_seeded_hash_not_the_first_choice():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 1.0, float("-inf")]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    tie = torch.tensor([[0.1, 0.9, 0.99], [0.5, 0.2, 0.3], [0.0, 0.9, 0.9]])
    assert choose(scores, valid, tie).tolist() == [1, 2, 0]


class Uniform(nn.Module):
    """Equal logits everywhere, cheap for a 50k vocabulary (the head runs on scored positions only)."""

    def __init__(self, width: int):
        super().__init__()
        self.head = nn.Linear(1, width, bias=False)
        nn.init.zeros_(self.head.weight)

    def hidden_states(self, x, causal=True, attn_mask=None):
        return torch.zeros(*x.shape, 1)


@pytest.fixture(scope="module")
def gpt2():
    from workbench.config import TokenizerConfig
    from workbench.tokenizer import load_tokenizer

    return load_tokenizer(TokenizerConfig(kind="gpt2"))


@pytest.mark.parametrize("task", ["winogrande", "commonsense_qa"])
def test_a_trivial_model_scores_chance(task, gpt2, small_tokenizer):
    """All choices tie (one continuation for all options; one-token letter answers, whose gold labels are far
    from balanced): accuracy is chance within binomial error, where first-index tie-breaking would not be."""
    from workbench.config import DownstreamConfig
    from workbench.evaluation.tasks import evaluate_task, prepare_task

    tok = small_tokenizer if task == "winogrande" else gpt2  # GPT-2: every letter answer is a single token
    prepared = prepare_task(task, tok, DownstreamConfig(tasks=[task], limit=None, batch_size=256), seq_len=256)
    assert all(len({len(row) - start for row, start in zip(item.rows, item.cont_start)}) == 1
               for item in prepared.items)  # the premise: the choices of an item have equally many tokens
    model = ToyLM(Uniform(64 * math.ceil(tok.vocab_size / 64)), "ar", True, tok.vocab_size, tok.mask_id, tok.eos_id)
    values = evaluate_task(model, prepared)
    chance = sum(1 / len(item.rows) for item in prepared.items) / len(prepared.items)
    sigma = math.sqrt(chance * (1 - chance) / len(prepared.items))
    assert len(prepared.items) > 1000
    for metric in ("acc", "acc_norm"):
        assert abs(values[metric] - chance) < 3.5 * sigma, (metric, values[metric], chance)
    assert values["stderr"] == pytest.approx(math.sqrt(values["acc"] * (1 - values["acc"]) / (len(prepared.items) - 1)))


class Oracle(nn.Module):
    """Knows the gold rows: predicts a gold row's next token (causal) or a gold token at each masked position
    (bidirectional) whenever the visible tokens agree with that gold row, else uniform logits."""

    def __init__(self, gold_rows: list[list[int]], width: int, mask_id: int, big: float = 30.0):
        super().__init__()
        length = max(map(len, gold_rows)) + 1
        self.gold = torch.full((len(gold_rows), length), -1, dtype=torch.long)
        for g, row in enumerate(gold_rows):
            self.gold[g, :len(row)] = torch.tensor(row)
        self.lengths = torch.tensor([len(row) for row in gold_rows])
        self.onehot = torch.nn.functional.one_hot(self.gold.clamp(min=0), width).float() * (self.gold >= 0)[..., None]
        self.mask_id, self.big = mask_id, big

    def forward(self, x, causal=True, attn_mask=None, zero_embed=None):
        length = x.shape[1]
        extra = max(0, length + 1 - self.gold.shape[1])  # distractor rows may be longer than every gold row
        gold = torch.nn.functional.pad(self.gold, (0, extra), value=-1)[:, :length]
        onehot = torch.nn.functional.pad(self.onehot, (0, 0, 0, extra))
        if causal:  # consistent[b, g, i]: x[b, :i+1] is a prefix of gold row g -> it predicts gold[g, i+1]
            consistent = (x[:, None, :] == gold[None]).long().cumprod(dim=2).float()
            hits = torch.einsum("bgi,giv->biv", consistent, onehot[:, 1:length + 1])
        else:
            valid = torch.ones_like(x, dtype=torch.bool) if attn_mask is None else attn_mask[:, 0, 0, :]
            visible = valid & (x != self.mask_id)
            agree = (~visible[:, None, :]) | (x[:, None, :] == gold[None])
            consistent = (agree.all(dim=2) & (self.lengths[None, :] == valid.sum(dim=1)[:, None])).float()
            hits = torch.einsum("bg,giv->biv", consistent, onehot[:, :length])
        return self.big * (hits > 0).float()


@pytest.fixture(scope="module")
def small_tokenizer():
    """A 300-token byte-level BPE trained on task text: short vocabulary, so the oracle's tables stay small."""
    from workbench.evaluation.tasks import read_task
    from workbench.tokenizer import train_bpe

    texts = [text for name in ("copa", "winograd_wsc", "openbook_qa", "lambada_openai")
             for item in read_task(name).items[:200] for text in (*item.contexts[:1], *item.continuations)]
    return train_bpe(texts, 300)


@pytest.mark.parametrize("scorer", ["ar", "mc-elbo", "chain", "pll"])
def test_a_model_that_knows_the_gold_answers_scores_100_percent(scorer, small_tokenizer):
    from workbench.config import DownstreamConfig
    from workbench.evaluation.tasks import evaluate_task, prepare_task

    tok = small_tokenizer
    width = 64 * math.ceil(tok.vocab_size / 64)
    for task in ("copa", "winograd_wsc", "openbook_qa", "lambada_openai"):  # 2 and 4 choices, schema, LM
        cfg = DownstreamConfig(tasks=[task], limit=10, scorer=scorer, samples=4, batch_size=32)
        prepared = prepare_task(task, tok, cfg, seq_len=1024)
        prepared.items = [item for item in prepared.items if len({tuple(r) for r in item.rows}) == len(item.rows)]
        assert len(prepared.items) >= 8 and prepared.stats.context_truncated == 0
        net = Oracle([item.rows[item.gold] for item in prepared.items], width, tok.mask_id)
        model = ToyLM(net, "ar" if scorer == "ar" else "mdm", scorer == "ar", tok.vocab_size, tok.mask_id, tok.eos_id)
        values = evaluate_task(model, prepared)
        assert values["acc"] == 1.0, (task, values)
        if task == "lambada_openai":
            assert values["ppl"] < 1.01
        else:
            assert values["acc_norm"] == 1.0
        assert ("elbo_stderr" in values) == (scorer == "mc-elbo")  # explicit exact scorers report no MC error


def test_score_batch_refuses_a_scorer_the_model_cannot_use(small_tokenizer):
    from workbench.config import DownstreamConfig
    from workbench.evaluation.tasks import prepare_task

    task = prepare_task("copa", small_tokenizer, DownstreamConfig(tasks=["copa"], limit=2, scorer="chain"), 64)
    batch = next(iter(task.dataloader()))
    model = ToyLM(ContextFree(torch.zeros(320)), "ar", True, small_tokenizer.vocab_size, small_tokenizer.mask_id)
    with pytest.raises(ValueError, match="the chain scorer needs a masked-diffusion model"):
        score_batch(model, batch)


# --------------------------------------------------------------------------------------------------------------
# sampling and generative perplexity


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all() and torch.isfinite(filter_logits(logits, top_k=2)
                                                                                        [0, :2]).all()
    nucleus = filter_logits(logits, top_p=0.7)  # 0.5 + 0.3 reaches 0.7: keep two
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)[0, 0]) and torch.isinf(filter_logits(logits, top_p=0.5)
                                                                                  [0, 1:]).all()
    assert torch.allclose(filter_logits(logits, temperature=2.0), logits / 2)


def test_draw_samples_the_softmax():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1, 0.0]))
    samples = draw(logits.expand(40000, -1), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(samples, minlength=4).double() / 40000
    assert torch.allclose(frequencies, torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64), atol=0.01)


def test_mdm_ancestral_sampling_cached_equals_uncached_with_fewer_forwards():
    net = Neighbours(_random(WIDTH, WIDTH, seed=17), shift=-1)
    prefix = torch.tensor([[EOS, 5, 6]] * 4)
    runs = {}
    for cached in (True, False):
        runs[cached] = sample_mdm(net, prefix, 24, steps=64, mask_id=MASK, shifted=False, vocab_size=VOCAB,
                                  cached=cached, generator=torch.Generator().manual_seed(1))
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    assert runs[True].forwards < runs[False].forwards == 64 and (runs[True].row_forwards <= 21).all()
    tokens = runs[True].tokens
    assert torch.equal(tokens[:, :3], prefix) and (tokens != MASK).all() and (tokens < VOCAB).all()


def test_samplers_follow_the_model_distribution():
    w = torch.full((WIDTH,), -1e9)
    w[2:6] = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    net = ContextFree(w)
    generator = torch.Generator().manual_seed(2)
    mdm = sample_mdm(net, torch.full((200, 1), EOS), 41, steps=1, mask_id=MASK, shifted=False, vocab_size=VOCAB,
                     generator=generator).tokens[:, 1:]
    ar = sample_ar(net, torch.full((200, 1), EOS), 41, vocab_size=VOCAB, mask_id=MASK, generator=generator)[:, 1:]
    for tokens in (mdm, ar):
        frequencies = torch.bincount(tokens.flatten(), minlength=6)[2:6].double() / tokens.numel()
        assert torch.allclose(frequencies, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), atol=0.02)
    greedy = sample_ar(Neighbours(_random(WIDTH, WIDTH, seed=18), 0), torch.tensor([[EOS]]), 6, vocab_size=VOCAB,
                       mask_id=MASK, top_k=1)
    table = _random(WIDTH, WIDTH, seed=18)
    for j in range(1, 6):
        scores = table[greedy[0, j - 1]].clone()
        scores[VOCAB:] = scores[MASK] = float("-inf")
        assert int(greedy[0, j]) == int(scores.argmax())


def test_generative_perplexity_of_a_context_free_model(small_tokenizer):
    tok = small_tokenizer
    width = 64 * math.ceil(tok.vocab_size / 64)
    w = _random(width, seed=19)
    model = ToyLM(ContextFree(w), "ar", True, tok.vocab_size, tok.mask_id, tok.eos_id)
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "a short one"]
    ppl, nll, count = generative_perplexity(model, tok, texts, seq_len=16, rows_per_forward=5)
    ids = [i for text in texts for i in tok.encode(text)]
    logp = w.double().log_softmax(dim=0)
    assert count == len(ids) and nll == pytest.approx(-sum(float(logp[i]) for i in ids), rel=1e-5)
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-9)


def test_acc_norm_divides_by_characters_as_the_harness_and_acc_bytes_by_bytes():
    """lm-evaluation-harness's acc_norm: argmax of loglik / len(choice) in characters. Choice 0 is "éé" (2
    characters, 4 UTF-8 bytes, loglik -3.0), choice 1 "ab" (2 and 2, loglik -2.4): per character choice 1 wins
    (-1.2 > -1.5), per byte choice 0 (-0.75 > -1.2)."""
    from workbench.evaluation.tasks import MULTIPLE_CHOICE, BatchOptions, EncodedItem, collate_items

    logp = torch.full((WIDTH,), -30.0)
    logp[2], logp[3] = -1.5, -1.2
    logp[4] = math.log1p(-math.exp(-1.5) - math.exp(-1.2))  # the rest of the mass: logp is normalised
    choices = ["éé", "ab"]
    item = EncodedItem(0, [[EOS, 2, 2], [EOS, 3, 3]], [1, 1], [len(c.encode("utf-8")) for c in choices],
                       [len(c) for c in choices], gold=1, truncated=False)
    assert item.cont_bytes == [4, 2] and item.cont_chars == [2, 2]
    batch = collate_items([item], BatchOptions("piqa", MULTIPLE_CHOICE, scorer="ar"), pad_id=PAD)
    model = ToyLM(ContextFree(logp), "ar", True, VOCAB, MASK)
    out = score_batch(model, batch)
    values = {key: (num / den).item() for key, (num, den) in out.items()}
    assert values["acc"] == 1.0  # raw loglik: -2.4 > -3.0
    assert values["acc_norm"] == 1.0 and values["acc_bytes"] == 0.0
