"""Corpus -> MosaicML Streaming MDS shards with an exact unique-token budget.

Documents are read through Hugging Face ``datasets`` (parquet, jsonl(.gz), plain text, or a hub name),
tokenized, joined with EOS and cut into fixed-length sequences. The training set is the first
``unique_tokens`` tokens (rounded down to whole sequences) of the documents in a seeded random order, so
"N unique tokens x E epochs" is an exact experimental variable; the validation set is the first
``val_tokens`` tokens of the validation split in file order, shared by every run with the same tokenizer and
sequence length. A ``manifest.json`` beside the shards records what went in; preparing the same thing again
is a no-op, and a folder holding something else is never overwritten silently.

Any number of processes may call :func:`prepare` at once (every rank under Composer's launcher, parallel
ablation runs, Optuna workers, several hosts on a shared folder): each output (BPE tokenizer, train split, val
split) is built by one of them under an inter-process lock and published by a rename; the others wait and reuse
it (see :mod:`datasets_prep.cache`). Outputs are keyed by the sha256 of the corpus files, so an input edited in
place gets new shards.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasets_prep.cache import (
    atomic_write_bytes,
    ensure_writable,
    exclusive,
    file_sha256,
    publish_dir,
    remove_stale_temps,
    temp_dir_beside,
)
from workbench.config import DataConfig
from workbench.paths import expand, prepared_dir
from workbench.tokenizer import TextTokenizer, from_tokenizer_json, load_tokenizer, train_bpe

MANIFEST_VERSION = 1
EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text"}


class CorpusError(ValueError):
    """Bad corpus input, reported before any shard is written."""


# errors of a write inside ``datasets`` that mean its cache folder is unusable, not that the corpus is bad
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC, errno.EDQUOT}


def _cache_error(folder: Path, err: OSError, what: str = "the prepared-data cache") -> CorpusError:
    """One line naming the folder that cannot be written and how to move it elsewhere."""
    reason = err.strerror or str(err)
    if folder.is_relative_to(prepared_dir()):
        where = f"set WORKBENCH_PREPARED to a writable folder (now {prepared_dir()})"
    else:
        where = "choose a writable output folder"
    return CorpusError(f"{folder}: cannot write {what} there ({reason}); {where}")


def _writable(folder: Path, what: str = "the prepared-data cache") -> Path:
    """``folder``, created and proven writable, or a :class:`CorpusError` naming it (before any expensive work)."""
    try:
        ensure_writable(folder)
    except OSError as err:
        raise _cache_error(folder, err, what) from None
    return folder


def _locked(target: Path, what: str, log: Callable[[str], None]):
    """The inter-process lock of ``target``, taken after proving its folder writable."""
    _writable(target.parent)
    return exclusive(target, waiting=lambda: log(f"[prep] {what}: another process is preparing {target}; waiting"))


@dataclass
class PreparedSplit:
    path: Path
    manifest: dict[str, Any]

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["num_sequences"])


@dataclass
class PreparedData:
    train: PreparedSplit
    val: PreparedSplit
    tokenizer: TextTokenizer


# --------------------------------------------------------------------------------------------------------------
# locating and reading documents


def _file_kind(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def resolve_split(corpus: str, split: str) -> list[Path] | None:
    """Files of one split, or None when ``corpus`` names a hub dataset (not a local path)."""
    root = Path(expand(corpus))
    looks_local = root.exists() or corpus.startswith(("/", ".", "~", "${")) or os.sep in corpus.strip("/")
    if not looks_local:
        return None
    if not root.exists():
        raise CorpusError(f"data.corpus: {root} does not exist")
    target = root / split if root.is_dir() else root
    if root.is_dir() and not target.exists():
        choices = sorted(p.name for p in root.iterdir() if p.is_dir() or _file_kind(p))
        raise CorpusError(f"data.corpus: no split {split!r} in {root} (expected {root / split} as a folder or file; "
                          f"found: {', '.join(choices) or 'nothing'})")
    files = sorted(p for p in target.rglob("*") if p.is_file() and _file_kind(p)) if target.is_dir() else [target]
    if not files:
        raise CorpusError(f"data.corpus: no .parquet, .jsonl[.gz] or .txt[.gz] files in {target}")
    unknown = [p for p in files if _file_kind(p) is None]
    if unknown:
        raise CorpusError(f"data.corpus: {unknown[0]} is not .parquet, .jsonl[.gz], .json[.gz] or .txt[.gz]")
    kinds = {_file_kind(p) for p in files}
    if len(kinds) > 1:
        raise CorpusError(f"data.corpus: split {split!r} mixes file types {sorted(kinds)} in {target}")
    return files


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _clean_jsonl(path: Path, text_column: str, stats: dict[str, Any]) -> Path:
    """Check every line of a JSON-lines file; lines that are not UTF-8, not JSON, or lack a string
    ``text_column`` are skipped (counted, first examples recorded with file:line). Returns the file to load:
    the original, or a cleaned copy in the cache when lines were dropped."""
    good, bad, fields, first = [], 0, None, ""
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            reason, line_fields = _jsonl_line_problem(raw, text_column)
            if fields is None:
                fields = line_fields
            if reason is None:
                good.append(raw.rstrip(b"\n"))
                continue
            bad += 1
            first = first or f"{path}:{number}: {reason}"
            _count_skipped_line(stats, f"{path}:{number}: {reason}")
    if not good and fields is not None:
        raise CorpusError(f"data.text_column: {text_column!r} is not a field of {path} (fields: {', '.join(fields)})")
    if not good and bad:
        raise CorpusError(f"data.corpus: every line of {path} was skipped ({bad:,} of {bad:,} non-empty lines; "
                          f"first: {first}); each line must be a JSON object with a string field {text_column!r}")
    return _cleaned_copy(path, good) if bad else path


def _jsonl_line_problem(raw: bytes, text_column: str) -> tuple[str | None, list[str] | None]:
    """Why one JSON-lines line cannot be used (None: it can) and its object's fields (None: not an object), which
    name the available fields when no line has ``text_column``."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not valid UTF-8", None
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg})", None
    fields = sorted(record) if isinstance(record, dict) else None
    if fields is None or not isinstance(record.get(text_column), str):
        return f"no string field {text_column!r}", fields
    return None, fields


def _count_skipped_line(stats: dict[str, Any], where: str) -> None:
    """Count one skipped line in the manifest's stats; the first five (over all files) are kept as examples."""
    stats["skipped_lines"] = stats.get("skipped_lines", 0) + 1
    examples = stats.setdefault("skipped_line_examples", [])
    if len(examples) < 5:
        examples.append(where)


def _cleaned_copy(path: Path, good: list[bytes]) -> Path:
    """The kept lines of ``path`` in the cache, keyed by content: an edited file gets a new copy; equal content
    is written once, atomically."""
    cleaned = _writable(prepared_dir() / "cleaned") / f"{path.name.split('.')[0]}-{file_sha256(path)[:16]}.jsonl"
    if not cleaned.is_file():
        atomic_write_bytes(cleaned, b"\n".join(good) + b"\n")
    return cleaned


def load_documents(corpus: str, split: str, text_column: str, stats: dict[str, Any]):
    """A ``datasets.Dataset`` with one column, ``text_column``; ``stats`` collects counted skips."""
    import datasets

    datasets.disable_progress_bars()
    files = resolve_split(corpus, split)
    if files is None:
        cache = _writable(prepared_dir() / "hf-datasets", HF_CACHE)
        try:
            ds = datasets.load_dataset(corpus, split=split, cache_dir=str(cache))
        except OSError as err:
            _raise_if_unwritable(err, cache)
            raise CorpusError(f"data.corpus: could not load hub dataset {corpus!r} split {split!r}: {err}") from None
        except Exception as err:  # network, unknown name, unknown split
            raise CorpusError(f"data.corpus: could not load hub dataset {corpus!r} split {split!r}: {err}") from None
        source = [{"hub": corpus, "split": split}]
    else:
        kind = _file_kind(files[0])
        loaded = [_clean_jsonl(p, text_column, stats) for p in files] if kind == "json" else files
        options: dict[str, Any] = {"encoding_errors": "replace"} if kind == "text" else {}
        if kind == "text":
            options["sample_by"] = "paragraph"  # documents are separated by blank lines
        # Arrow cache per content: datasets' own key is the files' mtime, blind to edits that keep it
        content = hashlib.sha256("".join(file_sha256(p) for p in loaded).encode()).hexdigest()[:16]
        cache = _writable(prepared_dir() / "hf-datasets" / content, HF_CACHE)
        try:
            ds = datasets.load_dataset(kind, data_files=[str(p) for p in loaded], split="train", cache_dir=str(cache),
                                       **options)
        except OSError as err:
            _raise_if_unwritable(err, cache)
            raise CorpusError(f"data.corpus: could not read {', '.join(map(str, files))}: {err}") from None
        except Exception as err:
            raise CorpusError(f"data.corpus: could not read {', '.join(map(str, files))}: {err}") from None
        source = [{"file": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]
    if text_column not in ds.column_names:
        raise CorpusError(f"data.text_column: {text_column!r} is not a column of {corpus} split {split!r}; "
                          f"columns: {', '.join(ds.column_names)}")
    stats["source"] = source
    return ds.select_columns([text_column])


HF_CACHE = "the Hugging Face datasets cache of the prepared data"


def _raise_if_unwritable(err: OSError, cache: Path) -> None:
    """A write failure inside ``datasets`` names the folder it could not write, not the corpus."""
    if err.errno in _NOT_WRITABLE:
        folder = Path(err.filename) if err.filename else cache
        if folder.is_relative_to(cache):
            raise _cache_error(cache, err, HF_CACHE) from None
        raise CorpusError(f"{folder}: cannot write there ({err.strerror}) while loading the corpus with Hugging Face "
                          f"datasets (its own files move with HF_HOME)") from None


# --------------------------------------------------------------------------------------------------------------
# tokenizing and packing


def collect_tokens(docs, text_column: str, order: np.ndarray, tokenizer: TextTokenizer, needed: int,
                   stats: dict[str, Any], seq_len: int, batch_docs: int = 256) -> np.ndarray:
    """Tokenize documents in ``order``, join them with EOS and return exactly ``needed`` tokens."""
    out = np.empty(needed, dtype=np.int64)
    filled = 0
    counts = {"documents_used": 0, "documents_empty": 0, "documents_invalid_utf8": 0, "documents_longer_than_seq": 0}
    for start in range(0, len(order), batch_docs):
        texts = docs[order[start:start + batch_docs].tolist()][text_column]
        kept = []
        for text in texts:
            if text is None or not text.strip():
                counts["documents_empty"] += 1
                continue
            if "\ufffd" in text:
                counts["documents_invalid_utf8"] += 1  # bytes replaced by U+FFFD when the file was decoded
            kept.append(text)
        for ids in tokenizer.encode_batch(kept):
            piece = np.asarray([*ids, tokenizer.eos_id], dtype=np.int64)
            take = min(len(piece), needed - filled)
            out[filled:filled + take] = piece[:take]
            filled += take
            counts["documents_used"] += 1
            counts["documents_longer_than_seq"] += int(len(piece) > seq_len)
            if filled == needed:
                stats.update(counts)
                return out
    stats.update(counts)
    raise CorpusError(f"the split holds only {filled:,} tokens (after {counts['documents_empty']} empty documents "
                      f"were skipped) but {needed:,} were requested")


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the empirical token distribution: the loss of a context-free model that knows the
    exact token frequencies of this set."""
    counts = np.bincount(tokens.ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def write_shards(sequences: np.ndarray, out: Path, dtype: str, manifest: dict[str, Any],
                 tokenizer: TextTokenizer) -> None:
    """Write MDS shards, the tokenizer and the manifest into a uniquely named temporary folder beside ``out``,
    then rename it into place (callers hold ``out``'s lock; see :mod:`datasets_prep.cache`)."""
    from streaming import MDSWriter

    tmp = temp_dir_beside(out)
    try:
        rows = sequences.astype(dtype)
        with MDSWriter(out=str(tmp), columns={"tokens": f"ndarray:{dtype}"}, compression=None,
                       size_limit=1 << 26) as writer:  # an empty folder is accepted
            for row in rows:
                writer.write({"tokens": row})
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# the entry point


def _files_key(corpus: str, split: str, files: list[Path] | None) -> list[dict[str, Any]]:
    """Identity of a split's sources: names relative to the data folder (so moving it keeps the key), sizes, and
    the sha256 of the bytes (so a file edited in place, even at the same size and mtime, gets new shards)."""
    if files is None:
        return [{"hub": corpus, "split": split}]
    root = Path(expand(corpus))
    return [{"file": str(p.relative_to(root)) if p.is_relative_to(root) else p.name, "bytes": p.stat().st_size,
             "sha256": file_sha256(p)} for p in files]


def _spec_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def _check_existing(out: Path, spec: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The existing manifest if ``out`` already holds exactly ``spec``; refuse a different one unless forced."""
    path = out / "manifest.json"
    if not path.is_file():
        if out.exists() and any(out.iterdir()) and not force:
            raise CorpusError(f"{out} exists without a manifest.json; refusing to overwrite it (use --force)")
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        if force:
            return None
        raise CorpusError(f"{path}: unreadable manifest ({err}); delete {out} to prepare it again, "
                          "or pass --force") from None
    if manifest.get("spec") == spec:
        return manifest
    if force:
        return None
    old = manifest.get("spec", {})
    differing = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
    raise CorpusError(f"{out} holds shards prepared with different arguments (differing: {', '.join(differing)}); "
                      "refusing to overwrite them: choose another output folder or pass --force")


def _tokenizer_for(cfg: DataConfig, train_docs_factory: Callable, corpus_key: list,
                   log: Callable[[str], None]) -> TextTokenizer:
    if cfg.tokenizer.kind != "bpe":
        return load_tokenizer(cfg.tokenizer)
    n_docs = cfg.tokenizer.train_documents

    def texts():
        docs = train_docs_factory()
        order = np.random.default_rng(0).permutation(len(docs))[:n_docs]
        column = docs.column_names[0]
        for start in range(0, len(order), 256):
            yield from (t for t in docs[order[start:start + 256].tolist()][column] if t)

    key = {"corpus": corpus_key, "column": cfg.text_column, "documents": n_docs, "vocab_size": cfg.tokenizer.vocab_size}
    return cached_bpe(key, texts, cfg.tokenizer.vocab_size, log)


def _read_cached_tokenizer(path: Path, log: Callable[[str], None]) -> TextTokenizer | None:
    """The cached tokenizer, or None when there is none or it is unreadable (then it is rebuilt, and said so)."""
    if not path.is_file():
        return None
    try:
        return from_tokenizer_json(path, "bpe")
    except ValueError as err:
        log(f"[prep] tokenizer: {err}; rebuilding it")
        return None


def cached_bpe(key: dict, texts_factory: Callable, vocab_size: int,
               log: Callable[[str], None] = print) -> TextTokenizer:
    """Train a BPE once per ``key`` (corpus content, documents, vocab size) and reuse it from the cache; one
    process trains it while concurrent ones wait, and a truncated or corrupt cached file is rebuilt."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = prepared_dir() / "tokenizers" / f"bpe{vocab_size}-{digest}.json"
    tokenizer = _read_cached_tokenizer(path, log)
    if tokenizer is not None:
        return tokenizer
    with _locked(path, "tokenizer", log):
        tokenizer = _read_cached_tokenizer(path, lambda _: None)  # built by the process we waited for?
        if tokenizer is None:
            log(f"[prep] tokenizer: training a {vocab_size}-token BPE on {key['documents']:,} documents")
            tokenizer = train_bpe(texts_factory(), vocab_size)
            atomic_write_bytes(path, tokenizer.tokenizer.to_str().encode())
            log(f"[prep] tokenizer: wrote {path}")
    return tokenizer


def prepare(cfg: DataConfig, out: str | Path | None = None, force: bool = False,
            log: Callable[[str], None] = print) -> PreparedData:
    """Prepare (or find already prepared) train and validation shards for a data config.

    ``out``: folder for this preparation (``train/`` and ``val/`` inside); default: a content-addressed folder
    under the prepared cache, so equal configs share shards and different ones never collide."""
    train_stats: dict[str, Any] = {}
    train_docs_cache: dict[str, Any] = {}

    def train_docs():
        if "docs" not in train_docs_cache:
            train_docs_cache["docs"] = load_documents(cfg.corpus, cfg.train_split, cfg.text_column, train_stats)
        return train_docs_cache["docs"]

    train_files = resolve_split(cfg.corpus, cfg.train_split)
    val_files = resolve_split(cfg.corpus, cfg.val_split)
    corpus_key = _files_key(cfg.corpus, cfg.train_split, train_files)
    val_key = _files_key(cfg.corpus, cfg.val_split, val_files)
    tokenizer = _tokenizer_for(cfg, train_docs, corpus_key, log)
    seq_len = cfg.seq_len
    unique = (cfg.unique_tokens // seq_len) * seq_len
    val_tokens = (cfg.val_tokens // seq_len) * seq_len
    common = {"version": MANIFEST_VERSION, "tokenizer": tokenizer.describe(), "seq_len": seq_len,
              "text_column": cfg.text_column}
    train_spec = {**common, "split": cfg.train_split, "corpus": corpus_key, "unique_tokens": unique,
                  "subset_seed": cfg.subset_seed}
    val_spec = {**common, "split": cfg.val_split, "corpus": val_key, "val_tokens": val_tokens}

    if out is None:
        corpus_name = Path(expand(cfg.corpus)).name if train_files is not None else cfg.corpus.replace("/", "_")
        tag = f"{tokenizer.kind}{tokenizer.vocab_size}-{tokenizer.sha256[:8]}-L{seq_len}"
        base = prepared_dir() / corpus_name / tag
        train_out = base / f"train-u{unique}-s{cfg.subset_seed}-{_spec_digest(train_spec)}"
        val_out = base / f"val-{val_tokens}-{_spec_digest(val_spec)}"
    else:
        train_out, val_out = Path(out) / "train", Path(out) / "val"

    splits = {}
    for name, target, spec in (("train", train_out, train_spec), ("val", val_out, val_spec)):
        existing = _check_existing(target, spec, force)  # outputs appear by a rename: a manifest means complete
        if existing is None:
            with _locked(target, name, log):
                remove_stale_temps(target)  # left by writers killed before publishing
                existing = _check_existing(target, spec, force)  # published by the process we waited for?
                if existing is None:
                    splits[name] = _prepare_split(cfg, name, target, spec, tokenizer, train_docs, train_stats, log)
                    continue
        log(f"[prep] {name}: already prepared at {target} ({existing['num_sequences']:,} sequences)")
        splits[name] = PreparedSplit(target, existing)
    return PreparedData(splits["train"], splits["val"], tokenizer)


def _prepare_split(cfg: DataConfig, name: str, target: Path, spec: dict[str, Any], tokenizer: TextTokenizer,
                   train_docs: Callable, train_stats: dict[str, Any], log: Callable[[str], None]) -> PreparedSplit:
    """Tokenize, pack and publish one split (the caller holds ``target``'s lock)."""
    seq_len = cfg.seq_len
    stats: dict[str, Any] = train_stats if name == "train" else {}
    if name == "train":
        docs = train_docs()
        order = np.random.default_rng(cfg.subset_seed).permutation(len(docs))
        needed = spec["unique_tokens"]
    else:
        docs = load_documents(cfg.corpus, cfg.val_split, cfg.text_column, stats)
        order = np.arange(len(docs))
        needed = spec["val_tokens"]
    log(f"[prep] {name}: tokenizing {expand(cfg.corpus)} split {spec['split']!r} into {needed:,} tokens "
        f"({needed // seq_len:,} sequences of {seq_len})")
    try:
        tokens = collect_tokens(docs, cfg.text_column, order, tokenizer, needed, stats, seq_len)
    except CorpusError as err:
        key = "data.unique_tokens" if name == "train" else "data.val_tokens"
        raise CorpusError(f"{key}: {err}") from None
    manifest = {
        "spec": spec, "num_sequences": needed // seq_len, "num_tokens": needed, "dtype": tokenizer.token_dtype,
        "requested_tokens": cfg.unique_tokens if name == "train" else cfg.val_tokens,
        **stats,
    }
    if name == "val":
        manifest["unigram_entropy"] = unigram_entropy(tokens)
    write_shards(tokens.reshape(-1, seq_len), target, tokenizer.token_dtype, manifest, tokenizer)
    log(f"[prep] {name}: wrote {target} ({manifest['documents_used']:,} documents, "
        f"{manifest['documents_empty']} empty skipped, {manifest.get('skipped_lines', 0)} bad lines skipped)")
    return PreparedSplit(target, manifest)


def load_prepared_tokenizer(split_dir: str | Path) -> TextTokenizer:
    """The tokenizer saved beside a prepared split (``ValueError`` naming the file when it is unreadable)."""
    return from_tokenizer_json(Path(split_dir) / "tokenizer.json")

