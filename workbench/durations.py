"""Counts (``5M``) and Composer duration strings (``16ep``, ``4Mtok``, ``20ba``, ``512sp``, ``0.02dur``): the one
parser and the one set of conversions between units.

Config validation, the trainer (epochs -> tokens), the ablation plan and time estimate, the results loader and
the study's pruner steps all read these strings; each used to carry its own regex or ``endswith`` chain, which
disagreed on suffixes (``4Mtok``) and fractions. Everything here is plain Python (no torch), so the CLI path can
import it.

One epoch is the unique-token budget rounded down to whole sequences (:func:`epoch_tokens`): that is what
``workbench prep`` writes, so an ``Nep`` duration and ``N x epoch_tokens`` tokens end at the same batch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

UNITS = ("ep", "ba", "tok", "sp", "dur")
_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9, "g": 10**9, "G": 10**9}
_NUMBER = r"([0-9][0-9_]*(?:\.[0-9]+)?)"
_COUNT = re.compile(rf"\s*{_NUMBER}\s*([kKmMbBgG]?)\s*")
_DURATION = re.compile(rf"\s*{_NUMBER}([kKmMbBgG]?)({'|'.join(UNITS)})\s*")
_EXAMPLES = "a duration such as '20ep', '500ba', '5Mtok' or '0.1dur'"


def parse_count(value: Any) -> int:
    """Parse a token or item count: ``5000000``, ``"5M"``, ``"2.5k"``, ``"1_000"`` -> int."""
    if isinstance(value, bool):
        raise ValueError("expected a count such as 5000000 or '5M', got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _COUNT.fullmatch(value)
        if match:
            number = float(match.group(1).replace("_", "")) * _SUFFIX[match.group(2)]
            if number.is_integer():
                return int(number)
    raise ValueError(f"expected a count such as 5000000 or '5M' (suffixes k, M, B), got {value!r}")


@dataclass(frozen=True)
class Duration:
    """A parsed duration: ``amount`` (suffix applied, may be fractional) of ``unit`` (one of :data:`UNITS`)."""

    amount: float
    unit: str

    def tokens(self, unique_tokens: int, seq_len: int | None = None, batch_size: int | None = None) -> float:
        """Training tokens this duration spans; ``unique_tokens`` is one epoch (see :func:`epoch_tokens`).

        ``sp`` needs ``seq_len`` and ``ba`` also ``batch_size`` (full batches: an epoch's short last batch is not
        counted); a ``dur`` fraction has no length of its own and raises ``ValueError``."""
        if self.unit == "ep":
            return self.amount * unique_tokens
        if self.unit == "tok":
            return self.amount
        if self.unit == "sp" and seq_len is not None:
            return self.amount * seq_len
        if self.unit == "ba" and seq_len is not None and batch_size is not None:
            return self.amount * seq_len * batch_size
        if self.unit == "dur":
            raise ValueError(f"{self}: a fraction of the run has no length in tokens of its own")
        raise ValueError(f"{self}: converting {self.unit} to tokens needs the sequence length"
                         + (" and batch size" if self.unit == "ba" else ""))

    def epochs(self, unique_tokens: int, seq_len: int | None = None, batch_size: int | None = None) -> float:
        """Epochs of the unique-token budget this duration spans (see :meth:`tokens`)."""
        return self.tokens(unique_tokens, seq_len, batch_size) / unique_tokens

    def __str__(self) -> str:
        return f"{self.amount:g}{self.unit}"


def split_duration(value: Any) -> Duration:
    """The one duration parser: a number with an optional k/M/B suffix and a unit -> :class:`Duration`.

    Accepts fractions in every unit (``1.5ep`` is a valid pruner step); :func:`parse_duration` adds the rules a
    run config's durations must follow."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"expected {_EXAMPLES}, got {value!r}")
    number, suffix, unit = match.groups()
    if unit == "dur" and suffix:
        raise ValueError(f"a 'dur' duration is a fraction of training in [0, 1], got {value!r}")
    return Duration(float(number.replace("_", "")) * _SUFFIX[suffix], unit)


def parse_duration(value: Any) -> str:
    """Validate a Composer time string and write it the way Composer reads it: ``'5Mtok'`` -> ``'5000000tok'``,
    ``'0.5dur'`` stays. Counts are whole and positive (``0ba`` is allowed), ``dur`` is a fraction in [0, 1]."""
    duration = split_duration(value)
    if duration.unit == "dur":
        if not 0 <= duration.amount <= 1:
            raise ValueError(f"a 'dur' duration is a fraction of training in [0, 1], got {value!r}")
        return f"{duration.amount}dur"
    if not duration.amount.is_integer():
        raise ValueError(f"expected {_EXAMPLES} (a whole number of {duration.unit}), got {value!r}")
    count = int(duration.amount)
    if count <= 0 and duration.unit != "ba":
        raise ValueError(f"duration must be positive, got {value!r}")
    return f"{count}{duration.unit}"


def epoch_tokens(unique_tokens: int, seq_len: int) -> int:
    """Tokens in one epoch: the unique-token budget rounded down to whole sequences (what prep writes)."""
    return unique_tokens // seq_len * seq_len


def epochs_in_tokens(duration: str, unique_tokens: int) -> str:
    """``'Nep'`` -> the same length in ``tok`` (one epoch = ``unique_tokens``); other units unchanged.

    Composer measures elapsed training in max_duration's unit, so with epochs a warmup of '0.02dur' rounds to
    zero and elapsed-fraction schedules (weight decay, AR fraction) would jump at epoch boundaries; in tokens they
    progress every batch, and training still ends exactly at the last epoch's end."""
    parsed = split_duration(duration)
    if parsed.unit != "ep":
        return duration
    return f"{round(parsed.tokens(unique_tokens))}tok"


def tokens_of_step(value: Any, unique_tokens: int) -> int:
    """A step measured in tokens seen: a count (``40000``, ``'2M'``), ``'2Mtok'`` or ``'1.5ep'`` -> tokens."""
    if isinstance(value, str) and value.strip().endswith("ep"):
        return round(split_duration(value).tokens(unique_tokens))
    if isinstance(value, str) and value.strip().endswith("tok"):
        value = value.strip().removesuffix("tok")
    return parse_count(value)
