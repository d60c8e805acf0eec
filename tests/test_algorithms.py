"""Each regularizer/objective algorithm: its functional form, the Event it acts on, and all of them composed."""

from __future__ import annotations

import itertools

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
    TimeSamplerConfig,
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


def test_masking_rate_modes():
    torch.manual_seed(2)
    assert torch.all(masking_rates(TokenMaskingConfig(rate=0.2), 5, "cpu") == 0.2)
    per_sequence = masking_rates(TokenMaskingConfig(max_rate=0.6), 20_000, "cpu")
    assert per_sequence.max() <= 0.6 and per_sequence.mean().item() == pytest.approx(0.3, abs=0.01)
    bell = masking_rates(TokenMaskingConfig(time_sampler=TimeSamplerConfig(name="beta", a=4, b=4)), 20_000, "cpu")
    assert bell.mean().item() == pytest.approx(0.5, abs=0.01) and bell.std() < per_sequence.std()


def test_token_masking_acts_after_the_dataloader_only():
    algorithm = TokenMasking(TokenMaskingConfig(rate=0.5), MASK, EOS, VOCAB)
    assert algorithm.match(Event.AFTER_DATALOADER, None)
    assert not any(algorithm.match(e, None) for e in (Event.INIT, Event.BATCH_START, Event.EVAL_BATCH_START))


# dropout -----------------------------------------------------------------------------------------------------


def test_apply_dropout_sets_the_documented_sites():
    net = apply_dropout(tiny_net(), DropoutConfig(mlp=0.1, mlp_site="output", attention=0.2, residual=0.05))
    assert dropout_rates(net) == {"blocks.0.mlp.output_dropout": 0.1, "blocks.0.attn.attn_dropout": 0.2,
                                  "blocks.0.attn.resid_dropout": 0.05}
    net = apply_dropout(tiny_net(), DropoutConfig(mlp=0.3))
    assert dropout_rates(net) == {"blocks.0.mlp.hidden_dropout": 0.3}
    assert Dropout(DropoutConfig()).match(Event.INIT, None)


def test_attention_dropout_changes_training_outputs_only():
    net = apply_dropout(tiny_net(), DropoutConfig(attention=0.5))
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
    cfg = DualConfig(ar_fraction=1.0, ar_fraction_end=0.0)
    assert [ar_fraction_at(cfg, p) for p in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]
    assert ar_fraction_at(DualConfig(ar_fraction=0.3), 0.9) == 0.3


def test_dual_sequence_mode_mixes_the_two_losses_by_token_count():
    net = tiny_net()
    tokens = torch.randint(2, VOCAB, (8, 16))
    torch.manual_seed(3)
    dual = DualObjective(DiffusionConfig(shifted=True), DualConfig(mode="sequences"), MASK)
    mixed = dual(net, {"tokens": tokens, "ar_fraction": 0.5})["loss"]
    torch.manual_seed(3)
    ar = ARObjective()(net, {"tokens": tokens[:4]})["loss"]
    mdm = MDMObjective(DiffusionConfig(shifted=True), MASK)(net, {"tokens": tokens[4:]})["loss"]
    assert mixed.item() == pytest.approx((ar.item() + mdm.item()) / 2, rel=1e-5)  # equal token counts


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
        install_objective(holder, MDMObjective(DiffusionConfig(), MASK))


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
