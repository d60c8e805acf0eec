"""Data and cache faults (issue 12): each gets one line naming the file or folder and what is allowed, no traceback,
before any expensive work; a damaged cache entry is rebuilt; prepared data follows the corpus content."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from streaming import StreamingDataset

from datasets_prep.cache import file_sha256
from workbench.cli import main
from workbench.paths import data_dir
from workbench.tokenizer import from_tokenizer_json

SMALL = ["--tokenizer", "bpe", "--vocab-size", "512", "-o", "data.tokenizer.train_documents=40", "--seq-len", "64",
         "--unique-tokens", "4096", "--val-tokens", "1024"]


@pytest.fixture(scope="module")
def articles() -> list[str]:
    frame = pl.read_parquet(data_dir() / "wikipedia-en" / "validation" / "part-0000.parquet", n_rows=70)
    return frame["text"].to_list()


def jsonl_corpus(root: Path, articles: list[str]) -> Path:
    """A user's corpus: ``train/part.jsonl`` (60 articles) and ``validation/part.jsonl`` (10)."""
    for split, rows in (("train", articles[:60]), ("validation", articles[60:])):
        (root / split).mkdir(parents=True)
        (root / split / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return root


def prep(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["prep", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def read_tokens(path: Path) -> np.ndarray:
    dataset = StreamingDataset(local=str(path), shuffle=False)
    return np.stack([dataset[i]["tokens"] for i in range(dataset.num_samples)])


def test_jsonl_whose_every_line_is_bad_names_the_users_file(tmp_path, capsys, articles, monkeypatch):
    monkeypatch.setenv("WORKBENCH_PREPARED", str(tmp_path / "prepared"))
    corpus = jsonl_corpus(tmp_path / "corpus", articles)
    bad = corpus / "train" / "part.jsonl"
    bad.write_text("".join(t[:80].replace("\n", " ") + "\n" for t in articles[:30]))  # plain text, not JSON
    code, _, err = prep(capsys, "--corpus", str(corpus), *SMALL)
    line = one_line_error(err)
    assert code == 2
    assert f"{bad}:" in line and "every line" in line and "30 of 30" in line and "cleaned" not in line


def test_truncated_cached_tokenizer_is_rebuilt_and_said_so(tmp_path, capsys, articles, monkeypatch):
    monkeypatch.setenv("WORKBENCH_PREPARED", str(tmp_path / "prepared"))
    corpus = jsonl_corpus(tmp_path / "corpus", articles)
    code, _, _ = prep(capsys, "--corpus", str(corpus), *SMALL)
    assert code == 0
    (cached,) = (tmp_path / "prepared" / "tokenizers").glob("bpe512-*.json")
    intact = cached.read_bytes()
    cached.write_bytes(intact[: len(intact) // 2])  # a copy or a full disk cut it short

    code, out, err = prep(capsys, "--corpus", str(corpus), *SMALL)
    assert code == 0, err
    assert f"{cached}: not a readable tokenizer file" in out and "rebuilding it" in out
    assert from_tokenizer_json(cached).vocab_size == 512  # readable again
    with pytest.raises(ValueError, match=rf"{cached.parent}/x\.json: not a readable tokenizer file"):
        (cached.parent / "x.json").write_text('{"version": "1.0", "truncat')
        from_tokenizer_json(cached.parent / "x.json")


def test_corpus_edited_in_place_gets_new_shards(tmp_path, articles, monkeypatch):
    from datasets_prep.corpus import prepare
    from workbench.config import DataConfig, TokenizerConfig

    monkeypatch.setenv("WORKBENCH_PREPARED", str(tmp_path / "prepared"))
    corpus = jsonl_corpus(tmp_path / "corpus", articles)
    cfg = DataConfig(corpus=str(corpus), tokenizer=TokenizerConfig(kind="bpe", vocab_size=512, train_documents=40),
                     unique_tokens=4096, val_tokens=1024, seq_len=64)
    before = prepare(cfg, log=lambda _: None)
    old_tokens = read_tokens(before.train.path)

    train = corpus / "train" / "part.jsonl"
    stat = train.stat()
    text = train.read_text()
    edited = text.replace("the", "THE")  # same size, different content
    assert len(edited) == len(text) and edited != text
    with train.open("r+") as handle:  # in place: same inode
        handle.write(edited)
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime restored (cp -p, rsync -t)
    assert train.stat().st_size == stat.st_size and train.stat().st_mtime_ns == stat.st_mtime_ns

    messages: list[str] = []
    after = prepare(cfg, log=messages.append)
    assert not any("already prepared" in m and "train" in m for m in messages), messages
    assert after.train.path != before.train.path and before.train.path.is_dir()  # old shards left for old runs
    assert {s["sha256"] for s in after.train.manifest["source"]} == {file_sha256(train)}
    new_tokens = read_tokens(after.train.path)
    assert not np.array_equal(new_tokens, old_tokens)

    monkeypatch.setenv("WORKBENCH_PREPARED", str(tmp_path / "fresh"))  # the same as preparing the edited corpus anew
    fresh = prepare(cfg, log=lambda _: None)
    assert np.array_equal(read_tokens(fresh.train.path), new_tokens)
    assert fresh.tokenizer.sha256 == after.tokenizer.sha256


def test_unwritable_prepared_cache_names_the_folder_and_the_variable(tmp_path, capsys, articles, monkeypatch):
    corpus = jsonl_corpus(tmp_path / "corpus", articles)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WORKBENCH_PREPARED", str(blocker / "prepared"))
    code, out, err = prep(capsys, "--corpus", str(corpus), *SMALL)
    line = one_line_error(err)
    assert code == 2 and "tokenizing" not in out and "training" not in out
    assert f"{blocker}/prepared" in line and "WORKBENCH_PREPARED" in line and "data.corpus" not in line


def test_unwritable_datasets_cache_names_it(tmp_path, capsys, articles, monkeypatch):
    """The prepared folder is writable but the Hugging Face datasets cache inside it is not."""
    corpus = jsonl_corpus(tmp_path / "corpus", articles)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "hf-datasets").write_text("in the way")
    monkeypatch.setenv("WORKBENCH_PREPARED", str(prepared))
    code, out, err = prep(capsys, "--corpus", str(corpus), "--tokenizer", "gpt2", "--seq-len", "64",
                          "--unique-tokens", "4096", "--val-tokens", "1024")
    line = one_line_error(err)
    assert code == 2 and "tokenizing" not in out
    assert f"{prepared}/hf-datasets" in line and "Hugging Face datasets cache" in line
    assert "WORKBENCH_PREPARED" in line and "data.corpus" not in line
