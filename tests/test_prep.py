"""Corpus -> MDS shards: exact budgets, determinism, manifests, no silent overwrites, bad input."""

from __future__ import annotations

import gzip
import json

import numpy as np
import polars as pl
import pytest
from streaming import StreamingDataset

from datasets_prep.corpus import CorpusError, prepare, unigram_entropy
from workbench.cli import main
from workbench.config import DataConfig, TokenizerConfig
from workbench.paths import data_dir
from workbench.tokenizer import load_tokenizer

BPE = TokenizerConfig(kind="bpe", vocab_size=512, train_documents=60)


def read_tokens(path) -> np.ndarray:
    dataset = StreamingDataset(local=str(path), shuffle=False)
    return np.stack([dataset[i]["tokens"] for i in range(dataset.num_samples)])


@pytest.fixture(scope="module")
def articles() -> list[str]:
    """Real Wikipedia articles (the start of the validation split)."""
    frame = pl.read_parquet(data_dir() / "wikipedia-en" / "validation" / "part-0000.parquet", n_rows=40)
    return frame["text"].to_list()


def test_exact_budget_determinism_and_manifest(tmp_path):
    cfg = DataConfig(tokenizer=BPE, unique_tokens=20_000, val_tokens=4096, seq_len=64, subset_seed=3)
    prepared = prepare(cfg, log=lambda _: None)
    manifest = prepared.train.manifest
    assert manifest["num_tokens"] == 20_000 // 64 * 64 == manifest["num_sequences"] * 64
    assert manifest["requested_tokens"] == 20_000 and manifest["spec"]["subset_seed"] == 3
    assert manifest["spec"]["tokenizer"]["sha256"] == prepared.tokenizer.sha256
    assert {s["file"].split("/")[-1] for s in manifest["source"]} >= {"part-0000.parquet"}
    tokens = read_tokens(prepared.train.path)
    assert tokens.shape == (312, 64)
    eos_count = int((tokens == prepared.tokenizer.eos_id).sum())  # one EOS after every document fully included
    assert manifest["documents_used"] - 1 <= eos_count <= manifest["documents_used"]
    assert not (tokens == prepared.tokenizer.mask_id).any()
    val = read_tokens(prepared.val.path)
    assert prepared.val.manifest["unigram_entropy"] == pytest.approx(unigram_entropy(val))

    mtime = (prepared.train.path / "manifest.json").stat().st_mtime_ns
    again = prepare(cfg, log=lambda _: None)  # same arguments: a no-op on the same folder
    assert again.train.path == prepared.train.path
    assert (prepared.train.path / "manifest.json").stat().st_mtime_ns == mtime

    other_seed = prepare(DataConfig(**{**cfg.__dict__, "subset_seed": 4}), log=lambda _: None)
    assert other_seed.train.path != prepared.train.path and other_seed.val.path == prepared.val.path
    assert not np.array_equal(read_tokens(other_seed.train.path), tokens)


def test_explicit_output_is_never_overwritten_silently(tmp_path):
    cfg = DataConfig(tokenizer=BPE, unique_tokens=8192, val_tokens=2048, seq_len=64)
    prepare(cfg, out=tmp_path / "shards", log=lambda _: None)
    bigger = DataConfig(**{**cfg.__dict__, "unique_tokens": 16384})
    with pytest.raises(CorpusError, match=r"differing: unique_tokens.*--force"):
        prepare(bigger, out=tmp_path / "shards", log=lambda _: None)
    forced = prepare(bigger, out=tmp_path / "shards", force=True, log=lambda _: None)
    assert forced.train.manifest["num_tokens"] == 16384


def test_bad_lines_and_empty_documents_are_counted_and_skipped(tmp_path, articles):
    train = tmp_path / "corpus" / "train"
    train.mkdir(parents=True)
    lines = [json.dumps({"text": t}).encode() for t in articles[:20]]
    lines.insert(3, b'{"text": "broken \xff\xfe bytes"}')  # not UTF-8
    lines.insert(5, b'{"text": "unterminated')  # not JSON
    lines.insert(7, json.dumps({"title": "no text field"}).encode())
    lines.insert(9, json.dumps({"text": "   \n "}).encode())  # empty document
    with gzip.open(train / "part.jsonl.gz", "wb") as handle:
        handle.write(b"\n".join(lines) + b"\n")
    (tmp_path / "corpus" / "validation.txt").write_bytes(
        "\n\n".join(articles[20:30]).encode() + b"\n\nLatin-1 caf\xe9 paragraph\n")
    cfg = DataConfig(corpus=str(tmp_path / "corpus"), val_split="validation.txt", tokenizer=BPE,
                     unique_tokens=4096, val_tokens=2048, seq_len=64)
    prepared = prepare(cfg, log=lambda _: None)
    manifest = prepared.train.manifest
    assert manifest["skipped_lines"] == 3 and manifest["documents_empty"] == 1
    examples = "\n".join(manifest["skipped_line_examples"])
    assert "part.jsonl.gz:4: not valid UTF-8" in examples and "part.jsonl.gz:6: not valid JSON" in examples
    assert "part.jsonl.gz:8: no string field 'text'" in examples
    assert prepared.val.manifest["documents_invalid_utf8"] == 1  # decoded with replacement, counted


def test_missing_inputs_and_short_corpora_fail_clearly(tmp_path, articles):
    with pytest.raises(CorpusError, match="does not exist"):
        prepare(DataConfig(corpus=str(tmp_path / "nowhere")))
    (tmp_path / "c" / "train").mkdir(parents=True)
    with pytest.raises(CorpusError, match=r"no \.parquet, \.jsonl\[\.gz\] or \.txt\[\.gz\] files"):
        prepare(DataConfig(corpus=str(tmp_path / "c")))
    (tmp_path / "c" / "train" / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in articles[:2]))
    (tmp_path / "c" / "validation").mkdir()
    (tmp_path / "c" / "validation" / "a.jsonl").write_text(json.dumps({"text": articles[3]}))
    with pytest.raises(CorpusError, match=r"data.unique_tokens: the split holds only [\d,]+ tokens"):
        prepare(DataConfig(corpus=str(tmp_path / "c"), tokenizer=BPE, seq_len=64, unique_tokens=10**7),
                log=lambda _: None)
    with pytest.raises(CorpusError, match=r"data\.text_column: 'body' is not a field of .*a\.jsonl \(fields: text\)"):
        prepare(DataConfig(corpus=str(tmp_path / "c"), text_column="body", seq_len=64, unique_tokens=1024),
                log=lambda _: None)


def test_local_tokenizers_reserve_eos_and_mask():
    gpt2 = load_tokenizer(TokenizerConfig(kind="gpt2"))
    assert (gpt2.eos_id, gpt2.mask_id, gpt2.vocab_size) == (50256, 50257, 50258)
    ids = gpt2.encode("Data-efficient language models")
    assert gpt2.decode(ids) == "Data-efficient language models" and gpt2.mask_id not in ids
    assert gpt2.encode("<|endoftext|>") == [50256]
    bert = load_tokenizer(TokenizerConfig(kind="bert", path="${data}/tokenizers/bert-base-uncased"))
    assert bert.mask_id == bert.tokenizer.token_to_id("[MASK]") and bert.vocab_size == 30522
    with pytest.raises(FileNotFoundError, match=r"encoder\.json"):
        load_tokenizer(TokenizerConfig(kind="gpt2", path="/nonexistent"))


def test_prep_command(tmp_path, capsys):
    code = main(["prep", "--tokenizer", "bpe", "--vocab-size", "512", "-o", "data.tokenizer.train_documents=60",
                 "--seq-len", "64", "--unique-tokens", "8k", "--val-tokens", "2k", "--out", str(tmp_path / "p")])
    assert code == 0
    out = capsys.readouterr().out
    assert "8,000 tokens in 125 sequences of 64" in out and "unigram entropy" in out
    assert json.loads((tmp_path / "p" / "train" / "manifest.json").read_text())["num_tokens"] == 8000
