"""The one duration parser (workbench/durations.py) and the callers that used to carry their own."""

from __future__ import annotations

import pytest

from workbench.durations import (
    Duration,
    epoch_tokens,
    epochs_in_tokens,
    parse_count,
    parse_duration,
    split_duration,
    tokens_of_step,
)


@pytest.mark.parametrize(("text", "amount", "unit"), [
    ("16ep", 16, "ep"), ("4Mtok", 4_000_000, "tok"), ("20ba", 20, "ba"), ("0.02dur", 0.02, "dur"),
    ("512sp", 512, "sp"), ("1.5ep", 1.5, "ep"), ("2.5ktok", 2500, "tok"), (" 1_000ba ", 1000, "ba"),
    ("1Gtok", 10**9, "tok"),
])
def test_split_duration(text: str, amount: float, unit: str) -> None:
    assert split_duration(text) == Duration(amount, unit)


@pytest.mark.parametrize("bad", ["ep", "-3ep", "3", "3 ep", "3epochs", "1Mdur", 3, None, "1.5.ep"])
def test_split_duration_refuses(bad) -> None:
    with pytest.raises(ValueError, match="duration"):
        split_duration(bad)


def test_parse_duration_canonical_forms() -> None:
    assert parse_duration("4Mtok") == "4000000tok" and parse_duration("16ep") == "16ep"
    assert parse_duration("0.02dur") == "0.02dur" and parse_duration("0ba") == "0ba"
    for bad in ("1.5dur", "1.5ep", "0ep", "0tok", "2.5tok", "1Mdur"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_count("5M") == 5_000_000 and parse_count("1_000") == 1000
    with pytest.raises(ValueError, match="count"):
        parse_count("1.5")


def test_conversions() -> None:
    unique, seq_len, batch = epoch_tokens(10_000, 128), 128, 4
    assert unique == 9984  # whole sequences only, as prep writes them
    assert split_duration("3ep").tokens(unique) == 3 * unique
    assert split_duration("512sp").tokens(unique, seq_len) == 512 * 128
    assert split_duration("20ba").epochs(unique, seq_len, batch) == pytest.approx(20 * 128 * 4 / unique)
    assert split_duration("4Mtok").epochs(unique) == pytest.approx(4_000_000 / unique)
    for text, message in (("0.5dur", "fraction"), ("20ba", "batch size"), ("2sp", "sequence length")):
        with pytest.raises(ValueError, match=message):
            split_duration(text).tokens(unique)
    assert epochs_in_tokens("16ep", unique) == f"{16 * unique}tok"
    assert epochs_in_tokens("500ba", unique) == "500ba"
    assert tokens_of_step("1.5ep", 1000) == 1500 and tokens_of_step("2Mtok", 1000) == 2_000_000
    assert tokens_of_step(40000, 1000) == 40000 and tokens_of_step("16k", 1000) == 16000


def test_callers_agree_on_every_form() -> None:
    """The trainer, the ablation plan, the results loader and config validation read one duration the same way
    (the loader used to return None for a suffixed duration such as '2Mtok' in a hand-written config.yaml)."""
    from workbench.ablate.plan import planned_epochs
    from workbench.analysis.load import planned_epochs_of
    from workbench.config import config_from_dict

    data = {"unique_tokens": 10_000, "seq_len": 128, "batch_size": 4}
    unique = epoch_tokens(10_000, 128)
    for written, epochs in (("3ep", 3.0), ("2Mtok", 2_000_000 / unique), ("40ba", 40 * 512 / unique),
                            ("100sp", 100 * 128 / unique)):
        config = config_from_dict({"data": data, "trainer": {"max_duration": written}})
        assert planned_epochs(config) == pytest.approx(epochs)
        assert planned_epochs_of({"data": data, "trainer": {"max_duration": written}}) == pytest.approx(epochs)
        assert planned_epochs_of(config.to_dict()) == pytest.approx(epochs)
