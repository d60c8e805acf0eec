"""Zero-shot task files -> fixed item subsets -> token rows -> padded batches -> metrics and Composer evaluators.

The 12 tasks (:data:`TASKS`) are gzipped JSON-lines files in ``<data>/eval`` in the three LLM-Foundry schemas:
multiple choice ``{query, choices, gold}``, schema ``{context_options, continuation, gold}`` and language
modelling ``{context, continuation}``. Every item becomes one row (context, continuation) per choice or option.

- Reading: a line that is not JSON or breaks its schema is skipped with a warning ``file:line: reason``; a
  truncated gzip stream keeps the lines before the damage. Only a missing, unreadable or empty file is an error.
- Subset: the ``limit`` items with the smallest hash(seed, item index): every run sees the same items, a smaller
  limit is a subset of a larger one, and a skipped line changes no other item's membership.
- Text: the continuation follows its context after one space, except after whitespace or before closing
  punctuation (``"he" + ", then"``), so a leading space belongs to the continuation, as in training text.
- Tokens: the continuation's tokens are exactly those of encode(context + continuation) after the longest common
  prefix with encode(context), i.e. the joint tokenization the model saw in training. The two agree except where
  a punctuation or whitespace run straddles the boundary (``"etc." + "):"`` -> ``".):"``, 64 of 40k HellaSwag
  rows with GPT-2); then the straddling token is scored with the continuation (counted as a boundary merge).
- Rows: ``[EOS] + context + continuation``. EOS marks a document start (training joins documents with EOS) and is
  the always-visible anchor of shifted models. Long rows lose context tokens from the left; a continuation longer
  than seq_len - 1 keeps its first tokens. Both are counted, logged and reported (metric ``truncated``).

Metrics (tidy rows split = task name): ``acc`` (the gold choice has the highest summed log-likelihood; language
modelling: every continuation token is the model's greedy prediction under the scorer's conditioning), ``acc_norm``
(log-likelihood divided by the continuation's length in characters, without the joining space: lm-evaluation-
harness's acc_norm), ``acc_bytes`` (the same divided by its UTF-8 byte length instead), ``stderr``
(binomial standard error of acc, sqrt(p(1-p)/(n-1)) as the harness), ``ppl`` (language modelling: exp of the mean
per-item continuation NLL, the harness's LAMBADA perplexity; an upper bound under mc-elbo), ``elbo_stderr``
(mean Monte Carlo standard error of a choice's log-likelihood, nats; 0 for exact scorers; present when the scorer
is mc-elbo or auto) and ``truncated`` (fraction of items truncated). Exact ties are broken by a seeded hash of
(item, choice), not by the first index, so a constant model scores chance.

All tasks share one set of metric objects named by metric (``acc``...) in ``model.extra_metrics``; Composer
deep-copies the filtered set per evaluator label, so each task accumulates its own state and logs
``metrics/<task>/acc``. Evaluators filter with anchored names (``^acc$``) so no task metric leaks into another
evaluator (``acc`` would otherwise also select ``acc_norm``).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from workbench.config import ConfigError, DownstreamConfig
from workbench.metrics import TokenMean
from workbench.paths import data_dir

MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING = "multiple_choice", "schema", "language_modeling"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    file: str
    schema: str
    title: str


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("hellaswag", "hellaswag.jsonl.gz", MULTIPLE_CHOICE, "HellaSwag"),
    TaskSpec("piqa", "piqa.jsonl.gz", MULTIPLE_CHOICE, "PIQA"),
    TaskSpec("arc_easy", "arc_easy.jsonl.gz", MULTIPLE_CHOICE, "ARC-Easy"),
    TaskSpec("arc_challenge", "arc_challenge.jsonl.gz", MULTIPLE_CHOICE, "ARC-Challenge"),
    TaskSpec("openbook_qa", "openbook_qa.jsonl.gz", MULTIPLE_CHOICE, "OpenBookQA"),
    TaskSpec("siqa", "siqa.jsonl.gz", MULTIPLE_CHOICE, "Social IQa"),
    TaskSpec("commonsense_qa", "commonsense_qa.jsonl.gz", MULTIPLE_CHOICE, "CommonsenseQA"),
    TaskSpec("copa", "copa.jsonl.gz", MULTIPLE_CHOICE, "COPA"),
    TaskSpec("boolq", "boolq.jsonl.gz", MULTIPLE_CHOICE, "BoolQ"),
    TaskSpec("winogrande", "winogrande.jsonl.gz", SCHEMA, "WinoGrande"),
    TaskSpec("winograd_wsc", "winograd_wsc.jsonl.gz", SCHEMA, "Winograd WSC"),
    TaskSpec("lambada_openai", "lambada_openai.jsonl.gz", LANGUAGE_MODELING, "LAMBADA (OpenAI)"),
)}

TASKS_KEY = "eval.downstream.tasks"
MAX_REPORTED_LINES = 5  # malformed lines warned about individually per file; the rest are counted


def task_dir() -> Path:
    return data_dir() / "eval"


def task_path(name: str) -> Path:
    return task_dir() / TASKS[name].file


def parse_task_list(value: str | Sequence[str]) -> list[str]:
    """``"hellaswag,piqa"`` or a list -> names; ``all`` -> every task."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = [n for n in names if n]
    return list(TASKS) if names == ["all"] else names


def check_tasks(tasks: Sequence[str], source: str = "config") -> None:
    """Unknown names and missing files fail here, before any data is prepared or a model is built."""
    if not tasks:
        raise ConfigError(source, TASKS_KEY, "no task given; allowed: " + ", ".join(TASKS))
    seen = set()
    for name in tasks:
        if name not in TASKS:
            raise ConfigError(source, TASKS_KEY, f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
        if name in seen:
            raise ConfigError(source, TASKS_KEY, f"task {name!r} is listed twice")
        seen.add(name)
        path = task_path(name)
        if not path.is_file():
            raise ConfigError(source, TASKS_KEY, f"task {name!r}: file {path} not found (the data folder is "
                              f"{data_dir()}; set WORKBENCH_DATA or --data-dir)")


# --------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class TaskItem:
    """One item: row i scores ``continuations[i]`` after ``contexts[i]``; ``index`` is its position in the file."""

    index: int
    contexts: list[str]
    continuations: list[str]
    gold: int


@dataclass
class TaskData:
    spec: TaskSpec
    path: Path
    items: list[TaskItem]
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    lines: int = 0


def _string_list(record: dict, key: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} must be a list of at least two strings")
    if not all(v.strip() for v in value):
        raise ValueError(f"{key!r} holds an empty string")
    return value


def _string(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string")
    return value


def _gold(record: dict, n: int) -> int:
    gold = record.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        raise ValueError(f"'gold' must be an integer in [0, {n}), got {gold!r}")
    return gold


def parse_record(record: Any, schema: str, index: int) -> TaskItem:
    """A decoded JSON line -> TaskItem; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")
    if schema == MULTIPLE_CHOICE:
        choices = _string_list(record, "choices")
        query = _string(record, "query")
        return TaskItem(index, [query] * len(choices), choices, _gold(record, len(choices)))
    if schema == SCHEMA:
        options = _string_list(record, "context_options")
        continuation = _string(record, "continuation")
        if not continuation.strip():
            raise ValueError("'continuation' is empty")
        return TaskItem(index, options, [continuation] * len(options), _gold(record, len(options)))
    if schema == LANGUAGE_MODELING:
        context, continuation = _string(record, "context"), _string(record, "continuation")
        if not continuation.strip():
            raise ValueError("'continuation' is empty")
        return TaskItem(index, [context], [continuation], 0)
    raise ValueError(f"unknown schema {schema!r}")


def read_task(name: str, path: str | Path | None = None) -> TaskData:
    """Read a task file; malformed lines are skipped with a ``file:line: reason`` warning (never an exception)."""
    spec = TASKS[name]
    path = Path(path) if path is not None else task_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"task {name!r}: file {path} not found")
    data = TaskData(spec, path, [])
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    _read_line(data, number, raw)
    except (OSError, EOFError, zlib.error) as err:  # damaged/truncated gzip stream: keep what was read
        if number == 0 and not data.items:
            raise ValueError(f"task {name!r}: {path} is unreadable ({type(err).__name__}: {err})") from None
        _skip(data, number + 1, f"file damaged after this point ({type(err).__name__}: {err}); rest skipped")
    data.lines = number
    if len(data.skipped) > MAX_REPORTED_LINES:
        warnings.warn(f"{path}: {len(data.skipped)} malformed lines skipped in total", stacklevel=2)
    if not data.items:
        raise ValueError(f"task {name!r}: {path} holds no valid item ({len(data.skipped)} malformed lines)")
    return data


def _read_line(data: TaskData, number: int, raw: bytes) -> None:
    """Append line ``number``'s item to ``data``, or skip it with its reason (the warning points at read_task's
    caller, as for the other skipped lines)."""
    try:
        record = json.loads(raw.decode("utf-8"))
        data.items.append(parse_record(record, data.spec.schema, number - 1))
    except UnicodeDecodeError:
        _skip(data, number, "not valid UTF-8", stacklevel=4)
    except json.JSONDecodeError as err:
        _skip(data, number, f"not valid JSON ({err.msg})", stacklevel=4)
    except ValueError as err:
        _skip(data, number, str(err), stacklevel=4)


def _skip(data: TaskData, line: int, reason: str, stacklevel: int = 3) -> None:
    message = f"{data.path}:{line}: {reason}; line skipped"
    data.skipped.append(message)
    if len(data.skipped) <= MAX_REPORTED_LINES:
        warnings.warn(message, stacklevel=stacklevel)


def select_items(items: Sequence[TaskItem], limit: int | None, seed: int) -> list[TaskItem]:
    """The fixed subset: ``limit`` items with the smallest hash(seed, index), in file order (all if no limit)."""
    if limit is None or limit >= len(items):
        return list(items)
    from workbench.diffusion import hash_uniform

    keys = hash_uniform(seed, 0x5EB5E7, torch.tensor([item.index for item in items])).tolist()
    order = sorted(range(len(items)), key=lambda i: (keys[i], items[i].index))[:limit]
    return [items[i] for i in sorted(order)]


# --------------------------------------------------------------------------------------------------------------
# tokenization


_NO_SPACE_BEFORE = tuple(".,;:!?)]}")


def join_delimiter(context: str, continuation: str) -> str:
    """The text between context and continuation: one space, except where the joined text needs none."""
    if not context or context[-1].isspace() or not continuation or continuation[0].isspace():
        return ""
    return "" if continuation.startswith(_NO_SPACE_BEFORE) else " "


def split_tokens(tokenizer, contexts: Sequence[str], continuations: Sequence[str]
                 ) -> list[tuple[list[int], list[int], bool]]:
    """(context ids, continuation ids, boundary merged) per pair; continuation ids are exactly the tokens of the
    joined text after the context's (see the module docstring)."""
    unique = list(dict.fromkeys(contexts))
    encoded = dict(zip(unique, tokenizer.encode_batch(unique)))
    fulls = tokenizer.encode_batch([c + join_delimiter(c, x) + x for c, x in zip(contexts, continuations)])
    out = []
    for context, full in zip(contexts, fulls):
        ctx = encoded[context]
        if full[:len(ctx)] == ctx:
            out.append((ctx, full[len(ctx):], False))
            continue
        common = 0
        while common < min(len(ctx), len(full)) and ctx[common] == full[common]:
            common += 1
        out.append((full[:common], full[common:], True))
    return out


@dataclass
class EncodedItem:
    """One item as model rows ``[EOS] + context + continuation`` (already truncated to the model's length)."""

    index: int
    rows: list[list[int]]
    cont_start: list[int]
    cont_bytes: list[int]  # UTF-8 bytes of each continuation (acc_bytes' divisor)
    cont_chars: list[int]  # characters of each continuation (acc_norm's divisor, as lm-evaluation-harness)
    gold: int
    truncated: bool

    @property
    def max_len(self) -> int:
        return max(len(row) for row in self.rows)


@dataclass
class EncodeStats:
    items: int = 0
    rows: int = 0
    context_truncated: int = 0  # rows that lost context tokens
    continuation_truncated: int = 0  # rows whose continuation was cut to seq_len - 1 tokens
    boundary_merges: int = 0


def encode_items(items: Sequence[TaskItem], tokenizer, seq_len: int) -> tuple[list[EncodedItem], EncodeStats]:
    """Tokenize items into rows no longer than ``seq_len``, truncating contexts from the left."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2 (one conditioning token and one scored token)")
    contexts = [c for item in items for c in item.contexts]
    continuations = [x for item in items for x in item.continuations]
    pairs = iter(split_tokens(tokenizer, contexts, continuations))
    stats, out = EncodeStats(items=len(items)), []
    for item in items:
        rows, starts, nbytes, nchars, truncated = [], [], [], [], False
        for continuation in item.continuations:
            ctx, cont, merged = next(pairs)
            stats.rows += 1
            stats.boundary_merges += int(merged)
            if not cont:  # cannot happen for non-empty text; guard so a row always scores something
                raise ValueError(f"item {item.index}: continuation {continuation!r} produced no tokens")
            if len(cont) > seq_len - 1:
                cont = cont[:seq_len - 1]
                stats.continuation_truncated += 1
                truncated = True
            prefix = [tokenizer.eos_id, *ctx]
            keep = seq_len - len(cont)
            if len(prefix) > keep:
                if len(prefix) - keep > 1 or not ctx:  # losing only the EOS marker is not context truncation
                    stats.context_truncated += 1
                    truncated = True
                prefix = prefix[len(prefix) - keep:]
            rows.append(prefix + cont)
            starts.append(len(prefix))
            nbytes.append(len(continuation.encode("utf-8")))
            nchars.append(len(continuation))
        out.append(EncodedItem(item.index, rows, starts, nbytes, nchars, item.gold, truncated))
    return out, stats


# --------------------------------------------------------------------------------------------------------------
# batches


@dataclass(frozen=True)
class BatchOptions:
    """Scoring settings carried in every batch (primitives, so Composer broadcasts them to microbatches)."""

    task: str
    schema: str
    scorer: str = "auto"
    samples: int = 32
    rows_per_forward: int = 64
    seed: int = 1234
    cfg_weight: float = 0.0
    masking: str = "exact"

    @property
    def task_key(self) -> int:
        return zlib.crc32(self.task.encode()) & 0x7FFFFFFF


def collate_items(items: Sequence[EncodedItem], options: BatchOptions, pad_id: int) -> dict[str, Any]:
    """Items -> item-major padded tensors (B items, C choices, L = longest row in the batch)."""
    n_items, n_choices = len(items), max(len(item.rows) for item in items)
    length = max(item.max_len for item in items)
    tokens = torch.full((n_items, n_choices, length), pad_id, dtype=torch.long)
    lengths = torch.zeros(n_items, n_choices, dtype=torch.long)
    starts = torch.zeros(n_items, n_choices, dtype=torch.long)
    nbytes, nchars = torch.ones(n_items, n_choices), torch.ones(n_items, n_choices)
    for b, item in enumerate(items):
        for c, row in enumerate(item.rows):
            tokens[b, c, :len(row)] = torch.tensor(row)
            lengths[b, c], starts[b, c] = len(row), item.cont_start[c]
            nbytes[b, c], nchars[b, c] = max(item.cont_bytes[c], 1), max(item.cont_chars[c], 1)
    return {
        "task": options.task, "schema": options.schema, "scorer": options.scorer, "samples": options.samples,
        "rows_per_forward": options.rows_per_forward, "seed": options.seed, "task_key": options.task_key,
        "cfg_weight": float(options.cfg_weight), "masking": options.masking,
        "tokens": tokens, "length": lengths, "cont_start": starts, "choice_valid": lengths > 0,
        "cont_bytes": nbytes, "cont_chars": nchars,
        "gold": torch.tensor([item.gold for item in items], dtype=torch.long),
        "item": torch.tensor([item.index for item in items], dtype=torch.long),
        "truncated": torch.tensor([item.truncated for item in items], dtype=torch.bool),
    }


def split_items(batch: dict[str, Any], microbatch_size: int) -> list[dict[str, Any]]:
    """Composer microbatches: tensors split along items, settings repeated (no warning for a short batch)."""
    n_items = items_in_batch(batch)
    if n_items <= microbatch_size:
        return [batch]
    pieces = []
    for start in range(0, n_items, microbatch_size):
        pieces.append({key: value[start:start + microbatch_size] if torch.is_tensor(value) else value
                       for key, value in batch.items()})
    return pieces


def items_in_batch(batch: dict[str, Any]) -> int:
    return int(batch["gold"].shape[0])


def item_tokens_in_batch(batch: dict[str, Any]) -> int:
    """Tokens of the batch's rows (context + continuation of each choice) without their padding; a training
    batch's count is ``data.tokens_in_batch`` (every position of its packed sequences)."""
    return int(batch["length"].sum())


# --------------------------------------------------------------------------------------------------------------
# metrics


class TaskMetric(TokenMean):
    """A task metric from two device-side sums (numerator in ``total``, denominator in ``count``), reduced across
    ranks like the validation metrics; see the module docstring."""

    KINDS = ("acc", "acc_norm", "acc_bytes", "stderr", "ppl", "elbo_stderr", "truncated")

    def __init__(self, key: str):
        if key not in self.KINDS:
            raise ValueError(f"unknown task metric {key!r}; allowed: {', '.join(self.KINDS)}")
        super().__init__(key)

    def compute(self) -> torch.Tensor:
        mean = super().compute()
        if self.key == "stderr":  # binomial standard error of acc, with the sample variance's n - 1
            return torch.where(self.count > 1, (mean * (1 - mean) / (self.count - 1).clamp(min=1)).sqrt(),
                               torch.full_like(mean, math.nan))
        if self.key == "ppl":
            return mean.clamp(max=700.0).exp()
        return mean


def task_metric_names(schema: str, scorer: str) -> list[str]:
    """Metrics one task reports (``scorer`` as configured: auto may resolve to mc-elbo)."""
    names = ["acc", "stderr", "ppl"] if schema == LANGUAGE_MODELING else ["acc", "acc_norm", "acc_bytes", "stderr"]
    if scorer in ("auto", "mc-elbo"):
        names.append("elbo_stderr")
    return [*names, "truncated"]


def metric_filter(names: Sequence[str]) -> list[str]:
    """Anchored regexes for Composer's ``.*name.*`` metric filter: exactly these names."""
    return [f"^{re.escape(name)}$" for name in names]


# --------------------------------------------------------------------------------------------------------------
# prepared tasks, evaluators and the standalone loop


@dataclass
class PreparedTask:
    """A task ready to evaluate: its fixed item subset tokenized for one model length and tokenizer."""

    spec: TaskSpec
    options: BatchOptions
    items: list[EncodedItem]
    stats: EncodeStats
    available: int
    skipped: list[str]
    max_choices: int
    pad_id: int = 0  # any id: padding is excluded from attention and never scored

    @property
    def metric_names(self) -> list[str]:
        return task_metric_names(self.spec.schema, self.options.scorer)

    @property
    def items_per_batch(self) -> int:
        """Items per loader batch: about ``rows_per_forward`` (item, choice) rows."""
        return max(1, self.options.rows_per_forward // self.max_choices)

    def describe(self) -> str:
        s = self.stats
        text = (f"{self.spec.name}: {len(self.items)} of {self.available} items (seed {self.options.seed}), "
                f"{s.rows} rows, scorer {self.options.scorer}")
        if self.options.scorer in ("auto", "mc-elbo"):
            text += f" ({self.options.samples} samples if mc-elbo)"
        if s.context_truncated or s.continuation_truncated:
            text += (f"; truncated to the model length: {s.context_truncated} contexts (from the left), "
                     f"{s.continuation_truncated} continuations")
        if s.boundary_merges:
            text += f"; {s.boundary_merges} rows with a context/continuation token merge"
        if self.skipped:
            text += f"; {len(self.skipped)} malformed lines skipped (first: {self.skipped[0]})"
        return text

    def dataloader(self, distributed: bool = False) -> torch.utils.data.DataLoader:
        """Items sorted longest first (less padding; metrics are sums so order does not matter)."""
        items = sorted(self.items, key=lambda item: (-item.max_len, item.index))
        sampler = None
        if distributed:
            from composer.utils import dist

            sampler = dist.get_sampler(items, drop_last=False, shuffle=False)
        # its own generator: creating a DataLoader iterator draws a base seed from the global RNG otherwise, and
        # every evaluation would shift the training run's token masks and dropout
        return torch.utils.data.DataLoader(
            items, batch_size=self.items_per_batch, shuffle=False, sampler=sampler, num_workers=0,
            collate_fn=partial(collate_items, options=self.options, pad_id=self.pad_id),
            generator=torch.Generator().manual_seed(self.options.seed))


def prepare_task(name: str, tokenizer, cfg: DownstreamConfig, seq_len: int, path: str | Path | None = None
                 ) -> PreparedTask:
    """Read, subset and tokenize one task for a model of length ``seq_len``."""
    data = read_task(name, path)
    chosen = select_items(data.items, cfg.limit, cfg.seed)
    encoded, stats = encode_items(chosen, tokenizer, seq_len)
    options = BatchOptions(task=name, schema=data.spec.schema, scorer=cfg.scorers.get(name, cfg.scorer),
                           samples=cfg.samples, rows_per_forward=cfg.batch_size, seed=cfg.seed,
                           cfg_weight=cfg.cfg_weight, masking=cfg.masking)
    return PreparedTask(data.spec, options, encoded, stats, len(data.items), data.skipped,
                        max(len(item.rows) for item in encoded), pad_id=tokenizer.eos_id)


def register_metrics(model, names: Sequence[str]) -> None:
    """Put the task metrics into ``model.extra_metrics`` (returned by its get_metrics)."""
    for name in names:
        if name not in model.extra_metrics:
            model.extra_metrics[name] = TaskMetric(name)


def build_task_evaluators(model, tokenizer, cfg: DownstreamConfig, interval: str, seq_len: int,
                          log: Callable[[str], None] = print, objective: str | None = None) -> list:
    """One Composer Evaluator per task (label = task name), every ``cfg.interval`` or else ``interval``.

    ``objective`` (the run's objective name; the model only receives its objective at Event.INIT) lets a scorer
    that cannot score this model fail here rather than at the first evaluation."""
    from composer.core import DataSpec, Evaluator

    from workbench.evaluation.scoring import resolve_scorer

    check_tasks(cfg.tasks)
    evaluators = []
    for name in cfg.tasks:
        requested = cfg.scorers.get(name, cfg.scorer)
        key = f"eval.downstream.scorers.{name}" if name in cfg.scorers else "eval.downstream.scorer"
        if requested == "ar" and not model.shifted:
            raise ConfigError("config", key, "the ar scorer needs a next-token (shifted) model; this model is an "
                              "unshifted masked-diffusion model: use mc-elbo, chain or pll")
        if objective is not None:
            try:
                resolve_scorer(requested, objective, bool(model.shifted))
            except ValueError as err:
                raise ConfigError("config", key, str(err)) from None
        task = prepare_task(name, tokenizer, cfg, seq_len)
        log(f"[eval] {task.describe()}")
        register_metrics(model, task.metric_names)
        spec = DataSpec(task.dataloader(distributed=True), get_num_samples_in_batch=items_in_batch,
                        get_num_tokens_in_batch=item_tokens_in_batch, split_batch=split_items)
        evaluators.append(Evaluator(label=name, dataloader=spec, metric_names=metric_filter(task.metric_names),
                                    eval_interval=cfg.interval or interval,
                                    device_eval_microbatch_size=task.items_per_batch))
    return evaluators


@torch.no_grad()
def evaluate_task(model, task: PreparedTask, device: str | torch.device = "cpu",
                  autocast_dtype: torch.dtype | None = None,
                  on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Standalone evaluation of one prepared task (same batches, scorer and metrics as inside training);
    ``on_batch(items)`` after each batch (progress; a host-side count, no device sync)."""
    from workbench.evaluation.scoring import score_batch

    device = torch.device(device)
    metrics = {name: TaskMetric(name).to(device) for name in task.metric_names}
    was_training = model.training
    model.eval()
    try:
        for batch in task.dataloader():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outputs = score_batch(model, batch)
            for metric in metrics.values():
                metric.update(*outputs[metric.key])
            if on_batch is not None:
                on_batch(int(batch["gold"].shape[0]))
    finally:
        model.train(was_training)
    return {name: float(metric.compute()) for name, metric in metrics.items()}
