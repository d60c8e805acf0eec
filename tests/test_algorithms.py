"""Each regularizer/objective algorithm: its functional form, the Event it acts on, and all of them composed."""

from __future__ import annotations

import itertools
import math

import polars as pl
import pytest
import torch
from composer.core import Event

from workbench.algorithms import (
    Dropout,
    DualObjectiveMixing,
    MaskedDiffusion,
    TokenMasking,
    WeightDecay,
    apply_dropout,
    apply_token_masking,
    apply_weight_decay,
    ar_fraction_at,
    install_objective,
    is_ar_step,
)
from workbench.algorithms.dropout import dropout_rates
from workbench.algorithms.token_masking import masking_rates
from workbench.algorithms.weight_decay import decay_multiplier, exempt_parameters
from workbench.config import (
    DiffusionConfig,
    DropoutConfig,
    DualConfig,
    TokenMaskingConfig,
    WeightDecayConfig,
)
from workbench.model import Transformer, TransformerConfig
from workbench.objectives import ARObjective, DualObjective, MDMObjective
from workbench.results import read_metadata, read_metrics, read_summary
from workbench.train import train

EOS, MASK, VOCAB = 0, 1, 100


def tiny_net() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=VOCAB, max_seq_len=32, n_layers=1, d_model=32, n_heads=2))


# token masking -------------------------------------------------------------------------------------------------


def test_token_masking_realised_rate_matches_request_and_spares_eos():
    torch.manual_seed(0)
    tokens = torch.randint(2, VOCAB, (64, 512))
    tokens[:, ::8] = EOS
    out = apply_token_masking(tokens, torch.full((64,), 0.3), MASK, VOCAB, "mask", protected_ids=(EOS,))
    corrupted = out["inputs"] == MASK
    assert not corrupted[tokens == EOS].any()
    rate = corrupted[tokens != EOS].float().mean().item()
    assert rate == pytest.approx(0.3, abs=4 * (0.3 * 0.7 / corrupted[tokens != EOS].numel()) ** 0.5)
    assert torch.equal(out["inputs"][~corrupted], tokens[~corrupted])


def test_token_masking_replacements():
    torch.manual_seed(1)
    tokens = torch.randint(2, VOCAB, (8, 256))
    rate = torch.full((8,), 0.5)
    zero = apply_token_masking(tokens, rate, MASK, VOCAB, "zero")
    assert torch.equal(zero["inputs"], tokens) and 0.4 < zero["zero_embed"].float().mean() < 0.6
    random = apply_token_masking(tokens, rate, MASK, VOCAB, "random")["inputs"]
    assert not (random == MASK).any()
    assert 0.4 < (random != tokens).float().mean() < 0.6  # a random token rarely equals the original


def test_random_replacement_never_draws_eos_the_mask_or_other_special_ids():
    torch.manual_seed(5)
    vocab, special = 12, (EOS, 5, 7)
    tokens = torch.randint(2, vocab, (64, 256))
    out = apply_token_masking(tokens, torch.ones(64), MASK, vocab, "random", special_ids=special)["inputs"]
    counts = torch.bincount(out.flatten(), minlength=vocab)
    assert counts[[EOS, MASK, *special]].sum() == 0
    allowed = [i for i in range(vocab) if i not in (EOS, MASK, *special)]
    share = counts[allowed].double() / out.numel()  # uniform over the 8 real tokens
    assert torch.all((share - 1 / len(allowed)).abs() < 4 * (1 / len(allowed) / out.numel()) ** 0.5 * 2)


def test_token_masking_algorithm_excludes_the_tokenizers_special_ids():
    """The algorithm always excludes EOS and the mask id (EOS was drawn before); with the tokenizer's special ids
    (BERT: [PAD], [UNK], [CLS], [SEP], [MASK]) none of them is drawn either."""
    from types import SimpleNamespace

    from workbench.algorithms.token_masking import special_token_ids
    from workbench.config import TokenizerConfig
    from workbench.tokenizer import load_tokenizer

    bert = load_tokenizer(TokenizerConfig(kind="bert", path="${data}/tokenizers/bert-base-uncased"))
    assert special_token_ids(bert) == (0, 100, 101, 102, 103)
    torch.manual_seed(6)
    vocab = 8
    algorithm = TokenMasking(TokenMaskingConfig(rate=1.0, replacement="random"), MASK, EOS, vocab)
    state = SimpleNamespace(batch={"tokens": torch.randint(2, vocab, (32, 128))})
    algorithm.apply(Event.AFTER_DATALOADER, state, None)
    drawn = state.batch["inputs"]
    assert not torch.isin(drawn, torch.tensor([EOS, MASK])).any()
    assert set(drawn.unique().tolist()) == set(range(2, vocab))
    algorithm = TokenMasking(TokenMaskingConfig(rate=1.0, replacement="random"), MASK, EOS, vocab, special_ids=(4,))
    state = SimpleNamespace(batch={"tokens": torch.randint(2, vocab, (32, 128))})
    algorithm.apply(Event.AFTER_DATALOADER, state, None)
    assert set(state.batch["inputs"].unique().tolist()) == {2, 3, 5, 6, 7}


def test_the_trainer_gives_token_masking_the_tokenizers_special_ids(tiny_config):
    from workbench.train import build_algorithms

    config = tiny_config({"algorithms": {"token_masking": {"rate": 0.2, "replacement": "random"}}})
    algorithms = build_algorithms(config, MASK, EOS, VOCAB, special_ids=(EOS, MASK, 7))
    masking = next(algorithm for algorithm in algorithms if isinstance(algorithm, TokenMasking))
    assert masking.special_ids == (EOS, MASK, 7)


def test_masking_rate_modes():
    torch.manual_seed(2)
    assert torch.all(masking_rates(5, "cpu", rate=0.2) == 0.2)
    per_sequence = masking_rates(20_000, "cpu", max_rate=0.6)
    assert per_sequence.max() <= 0.6 and per_sequence.mean().item() == pytest.approx(0.3, abs=0.01)
    bell = masking_rates(20_000, "cpu", time_sampler="beta", sampler_params={"a": 4, "b": 4})
    assert bell.mean().item() == pytest.approx(0.5, abs=0.01) and bell.std() < per_sequence.std()


def test_token_masking_acts_after_the_dataloader_only():
    algorithm = TokenMasking(TokenMaskingConfig(rate=0.5), MASK, EOS, VOCAB)
    assert algorithm.match(Event.AFTER_DATALOADER, None)
    assert not any(algorithm.match(e, None) for e in (Event.INIT, Event.BATCH_START, Event.EVAL_BATCH_START))


# dropout -----------------------------------------------------------------------------------------------------


def test_apply_dropout_sets_the_documented_sites():
    net = apply_dropout(tiny_net(), mlp=0.1, mlp_site="output", attention=0.2, residual=0.05)
    assert dropout_rates(net) == {"blocks.0.mlp.output_dropout": 0.1, "blocks.0.attn.attn_dropout": 0.2,
                                  "blocks.0.attn.resid_dropout": 0.05}
    net = apply_dropout(tiny_net(), mlp=0.3)
    assert dropout_rates(net) == {"blocks.0.mlp.hidden_dropout": 0.3}
    assert Dropout(DropoutConfig()).match(Event.INIT, None)


def test_attention_dropout_changes_training_outputs_only():
    net = apply_dropout(tiny_net(), attention=0.5)
    x = torch.randint(0, VOCAB, (2, 16))
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    assert torch.allclose(net(x), net(x))


# weight decay ------------------------------------------------------------------------------------------------


def test_weight_decay_groups_and_exact_decoupled_step():
    net = tiny_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.0)
    apply_weight_decay(optimizer, net, 0.5, ["norm", "embedding"])
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    exempt = exempt_parameters(net, ["norm", "embedding"])
    assert id(net.embed.weight) in exempt and id(net.blocks[0].norm1.weight) in exempt
    assert id(net.blocks[0].mlp.fc.weight) not in exempt
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: AdamW's only change is the decay  p <- p (1 - lr wd)
    optimizer.step()
    params = dict(net.named_parameters())
    assert torch.allclose(params["blocks.0.mlp.fc.weight"], before["blocks.0.mlp.fc.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(params["embed.weight"], before["embed.weight"])


def test_weight_decay_schedule_and_events():
    assert decay_multiplier("constant", 0.7, 0.0) == 1.0
    assert decay_multiplier("linear", 0.5, 0.2) == pytest.approx(0.6)
    assert decay_multiplier("cosine", 0.0, 0.1) == pytest.approx(1.0)
    assert decay_multiplier("cosine", 1.0, 0.1) == pytest.approx(0.1)
    assert not WeightDecay(WeightDecayConfig()).match(Event.BATCH_START, None)
    assert WeightDecay(WeightDecayConfig(schedule="linear")).match(Event.BATCH_START, None)


def test_weight_decay_must_run_before_the_optimizer_has_state():
    net = tiny_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"Event\.INIT"):
        apply_weight_decay(optimizer, net, 0.1, [])


# objectives --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_dual_step_interleaving_is_exact(fraction):
    ar_steps = [s for s in range(400) if is_ar_step(s, fraction)]
    assert len(ar_steps) == round(400 * fraction)
    if 0 < fraction < 1:  # evenly spread: gaps differ by at most one step
        gaps = {b - a for a, b in itertools.pairwise(ar_steps)}
        assert max(gaps) - min(gaps) <= 1


def test_dual_fraction_schedule():
    assert [ar_fraction_at(p, 1.0, 0.0) for p in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]
    assert ar_fraction_at(0.9, 0.3) == 0.3


def test_dual_sequence_mode_mixes_the_two_losses_by_token_count():
    net = tiny_net()
    tokens = torch.randint(2, VOCAB, (8, 16))
    torch.manual_seed(3)
    dual = DualObjective(MASK, mode="sequences", shifted=True)
    mixed = dual(net, {"tokens": tokens, "ar_fraction": 0.5})["loss"]
    torch.manual_seed(3)
    ar = ARObjective()(net, {"tokens": tokens[:4]})["loss"]
    mdm = MDMObjective(MASK, shifted=True)(net, {"tokens": tokens[4:]})["loss"]
    assert mixed.item() == pytest.approx((ar.item() + mdm.item()) / 2, rel=1e-5)  # equal token counts


class CausalRows(torch.nn.Module):
    """Counts the sequences the AR (causal) path sees; uniform logits."""

    def __init__(self):
        super().__init__()
        self.ar_rows = 0

    def forward(self, x, causal=True, attn_mask=None, zero_embed=None):
        self.ar_rows += x.shape[0] if causal else 0
        return torch.zeros(*x.shape, VOCAB)


@pytest.mark.parametrize(("fraction", "microbatch"), [(0.1, 5), (0.1, 3), (0.25, 6), (0.5, 4)])
def test_dual_sequence_mode_trains_ar_on_alpha_of_the_sequences_in_expectation(fraction, microbatch):
    """Rounding alpha * B per microbatch gave 0 AR sequences for alpha 0.1 with B <= 5 and 1/3 for 0.25 with 6."""
    torch.manual_seed(4)
    net, steps = CausalRows(), 600
    dual = DualObjective(MASK, mode="sequences", ar_fraction=0.9, shifted=True)
    tokens = torch.randint(2, VOCAB, (microbatch, 8))
    for _ in range(steps):
        dual(net, {"tokens": tokens, "ar_fraction": fraction})  # the batch's alpha (the schedule) is what counts
    realised = net.ar_rows / (steps * microbatch)
    exact = fraction * microbatch
    spread = ((exact - math.floor(exact)) * (1 - exact + math.floor(exact))) ** 0.5 / microbatch  # per step
    assert abs(realised - fraction) <= 4 * spread / steps**0.5 + 1e-12, realised


def test_dual_algorithm_marks_batches_per_step():
    algorithm = DualObjectiveMixing(DiffusionConfig(), DualConfig(ar_fraction=0.5), MASK)
    assert algorithm.match(Event.INIT, None) and algorithm.match(Event.AFTER_DATALOADER, None)
    assert not algorithm.match(Event.EVAL_BATCH_START, None)


def test_a_model_has_exactly_one_objective():
    class Holder:
        objective = ARObjective()

    holder = Holder()
    install_objective(holder, MaskedDiffusion(DiffusionConfig(), MASK).objective)
    with pytest.raises(ValueError, match="already claimed"):
        install_objective(holder, MDMObjective(MASK))


# all of them in one run --------------------------------------------------------------------------------------


def test_all_algorithms_compose_in_one_run(tiny_config, results_root):
    config = tiny_config({
        "name": "composed",
        "objective": {"name": "dual", "z_loss": 1e-4, "dual": {"ar_fraction": 0.75, "ar_fraction_end": 0.25},
                      "diffusion": {"time_sampler": {"name": "beta", "a": 1.5, "b": 1.5}, "masking": "exact"}},
        "algorithms": {"token_masking": {"max_rate": 0.3, "replacement": "zero"},
                       "dropout": {"mlp": 0.1, "attention": 0.1},
                       "weight_decay": {"value": 0.1, "schedule": "cosine", "exempt": ["norm", "embedding"]}},
        "trainer": {"max_duration": "1ep"},
    })
    summary = train(config)
    assert summary["status"] == "complete"
    frame = read_metrics(results_root / "composed" / "metrics.parquet")
    val_metrics = set(frame.filter(pl.col("split") == "val")["metric"].to_list())
    assert {"ar_nll", "mdm_nelbo", "unigram_entropy"} <= val_metrics  # a mixed run is evaluated both ways
    assert frame.filter(pl.col("split") == "train")["value"].is_finite().all()
    algorithms = read_metadata(results_root / "composed" / "metrics.parquet")["algorithms"]
    assert algorithms["dropout"]["mlp"] == 0.1 and algorithms["token_masking"]["max_rate"] == 0.3
    assert algorithms["objective"]["dual"]["ar_fraction"] == 0.75
    assert read_summary(results_root / "composed")["final_mdm_nelbo"] > 0
