"""Vocabulary sizes known without loading a tokenizer (ablation time estimates) equal the loaded tokenizers'."""

from __future__ import annotations

import pytest

from workbench.config import TokenizerConfig
from workbench.tokenizer import load_tokenizer, vocab_size_of

BERT = "${data}/tokenizers/bert-base-uncased"


@pytest.mark.parametrize(("kind", "path"), [("gpt2", "${data}/tokenizers/gpt2"), ("bert", BERT)])
def test_known_sizes_are_the_loaded_tokenizers(kind: str, path: str) -> None:
    config = TokenizerConfig(kind=kind, path=path)
    assert vocab_size_of(config) == load_tokenizer(config).vocab_size
    assert vocab_size_of(TokenizerConfig(kind="bpe", vocab_size=512)) == 512


def test_ablation_shape_uses_bert_base_uncased_size(tiny_config) -> None:
    """The plan's shape key said 30,523 for BERT (bert-base-uncased has 30,522 ids)."""
    from workbench.ablate.plan import shape_key

    config = tiny_config({"data": {"tokenizer": {"kind": "bert", "path": BERT}}})
    assert 30522 in shape_key(config) and 30523 not in shape_key(config)
