"""Tokenizers from local files (GPT-2 BPE, BERT WordPiece) or a small byte-level BPE trained on the corpus.

Every tokenizer has an end-of-document id (EOS, joins packed documents) and a dedicated mask id reserved
for masked diffusion and input-token masking; neither occurs inside encoded text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

from workbench.config import TokenizerConfig
from workbench.paths import expand

EOS = "<|endoftext|>"
MASK = "<|mask|>"
# ids of the file-based tokenizers, added tokens included (GPT-2: 50,257 + the mask token; bert-base-uncased:
# 30,522, its [SEP] and [MASK] serve as EOS and mask); tests check them against the loaded tokenizers
VOCAB_SIZES = {"gpt2": 50258, "bert": 30522}


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    kind: str
    eos_id: int
    mask_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    @property
    def token_dtype(self) -> str:
        return "uint16" if self.vocab_size <= 65536 else "uint32"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.tokenizer.to_str())

    def describe(self) -> dict:
        return {"kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "mask_id": self.mask_id}


def from_tokenizer_json(path: str | Path, kind: str = "saved") -> TextTokenizer:
    """Load a tokenizer saved by :meth:`TextTokenizer.save` (EOS and mask are added tokens).

    Raises ``ValueError`` naming the file when it is not a tokenizer (truncated, empty, other JSON): the Rust
    parser's own message (``EOF while parsing a value at line 1``) names none."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for every parse failure
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found") from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable tokenizer file ({reason})") from None
    eos, mask = _special_ids(tok)
    return TextTokenizer(tok, kind, eos, mask)


def _special_ids(tok: Tokenizer) -> tuple[int, int]:
    eos = tok.token_to_id(EOS)
    if eos is None:
        eos = tok.token_to_id("[SEP]")
    mask = tok.token_to_id(MASK)
    if mask is None:
        mask = tok.token_to_id("[MASK]")
    if eos is None or mask is None:
        raise ValueError("tokenizer has no end-of-document or mask token")
    return eos, mask


def vocab_size_of(cfg: TokenizerConfig) -> int:
    """The vocabulary size a config gives, without loading or training the tokenizer (time estimates)."""
    return cfg.vocab_size if cfg.kind == "bpe" else VOCAB_SIZES[cfg.kind]


def load_tokenizer(cfg: TokenizerConfig, training_texts: Iterable[str] | None = None) -> TextTokenizer:
    """Build the tokenizer a config names. ``bpe`` needs ``training_texts`` unless a cached copy exists."""
    if cfg.kind == "gpt2":
        folder = Path(expand(cfg.path))
        vocab, merges = folder / "encoder.json", folder / "vocab.bpe"
        for required in (vocab, merges):
            if not required.is_file():
                raise FileNotFoundError(f"tokenizer.path: GPT-2 tokenizer file {required} not found "
                                        "(expected encoder.json and vocab.bpe)")
        tok = ByteLevelBPETokenizer.from_file(str(vocab), str(merges))
        tok.add_special_tokens([EOS, MASK])  # EOS already exists (id 50256); MASK becomes 50257
        return TextTokenizer(tok._tokenizer, "gpt2", tok.token_to_id(EOS), tok.token_to_id(MASK))
    if cfg.kind == "bert":
        vocab = Path(expand(cfg.path))
        vocab = vocab / "vocab.txt" if vocab.is_dir() else vocab
        if not vocab.is_file():
            raise FileNotFoundError(f"tokenizer.path: BERT vocabulary {vocab} not found")
        tok = BertWordPieceTokenizer(str(vocab), lowercase=True)
        return TextTokenizer(tok._tokenizer, "bert", tok.token_to_id("[SEP]"), tok.token_to_id("[MASK]"))
    if training_texts is None:
        raise ValueError("a bpe tokenizer is trained on the corpus; pass training_texts")
    return train_bpe(training_texts, cfg.vocab_size)


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE; EOS is id 0 and the mask token id 1 (cached per corpus by
    :func:`datasets_prep.corpus.prepare`)."""
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, MASK],
                            show_progress=False)
    return TextTokenizer(tok._tokenizer, "bpe", tok.token_to_id(EOS), tok.token_to_id(MASK))
