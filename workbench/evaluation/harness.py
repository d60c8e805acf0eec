"""lm-evaluation-harness on workbench checkpoints: a harness model named ``workbench``.

    workbench eval results/my-run --harness wb_piqa,wb_arc_easy --limit 200
    python -m workbench.evaluation.harness --model workbench --model_args run=results/my-run \\
        --tasks wb_piqa,arc_easy --include_path workbench/evaluation/harness_tasks

The second line is the harness's own CLI (every flag of ``lm-eval run``); the module only registers the model
first, because lm-eval discovers third-party models by import, not by entry point.

Scores (:class:`WorkbenchHarnessLM`):

- ``loglikelihood``: the continuation's log-likelihood after its context. AR runs (objectives ar, prefix_lm,
  dual): exact next-token log-likelihood. Masked-diffusion runs (mdm): the Monte Carlo ELBO of the continuation
  with the context visible (``samples`` stratified times, default 32), a *lower bound* on the log-likelihood
  (a Monte Carlo estimate of one), not the likelihood itself; ``is_greedy`` is whether one parallel decoding
  step with the whole continuation masked reproduces it. ``scorer`` (``auto``, ``ar``, ``mc-elbo``, ``chain``,
  ``pll``) and ``masking`` choose as in ``workbench eval``; noise is keyed by the context, so the choices of one
  question share their masks.
- ``loglikelihood_rolling``: the harness's disjoint rolling windows of the model's length (EOS as the first
  window's context), each scored as above; for MDM the sum of window ELBOs (a bound).
- ``generate_until``: greedy decoding (AR token by token; MDM ancestral unmasking with ``mdm_steps`` steps,
  default one per new token; seeded positions, each revealed as its most likely token), stopped at the first
  ``until`` string or after ``max_gen_toks`` tokens, within the model's context length.

Tokens: exactly the workbench's task rows (:func:`workbench.evaluation.tasks.encode_items`): ``[EOS] + context +
continuation``, the continuation being the tokens of ``context + continuation`` after their longest common prefix
with the context's tokens, left-truncated to the model length. The harness's requests arrive joined already
(its ``target_delimiter``), so no space is inserted here. The ``wb_*`` task YAMLs in ``harness_tasks/`` read the
bundled task files offline and write the workbench's joining rule into the requests (see their utils.py), which
makes ``acc``/``acc_norm`` of ``wb_piqa`` equal to ``workbench eval --tasks piqa`` item by item (tests/
test_harness.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

HARNESS_TASKS = Path(__file__).resolve().parent / "harness_tasks"
MODEL_NAME = "workbench"
ROWS_PER_CHUNK = 256  # requests scored together (sorted by length, so padding stays small)


def torch_device(choice: Any) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``gpu``/``cuda``/``cuda:N`` (the harness passes its --device)."""
    from workbench.devices import resolve_device

    return torch.device(resolve_device("auto" if choice in (None, "") else str(choice)))


def request_rows(tokenizer, pairs: list[tuple[str, str]], seq_len: int) -> tuple[list[list[int]], list[int]]:
    """(context, continuation) pairs -> rows ``[EOS] + context + continuation`` and continuation starts, as
    :func:`workbench.evaluation.tasks.encode_items` builds them, for text that is already joined."""
    contexts = list(dict.fromkeys(c for c, _ in pairs))
    encoded = dict(zip(contexts, tokenizer.encode_batch(contexts))) if contexts else {}
    fulls = tokenizer.encode_batch([c + x for c, x in pairs]) if pairs else []
    rows, starts = [], []
    for (context, continuation), full in zip(pairs, fulls):
        ctx = encoded[context]
        common = 0
        while common < min(len(ctx), len(full)) and ctx[common] == full[common]:
            common += 1
        ctx, cont = full[:common], full[common:]
        if not cont:
            raise ValueError(f"continuation {continuation!r} after {context[-40:]!r} produced no tokens")
        cont = cont[:seq_len - 1]
        prefix = [tokenizer.eos_id, *ctx]
        prefix = prefix[max(0, len(prefix) - (seq_len - len(cont))):]
        rows.append(prefix + cont)
        starts.append(len(prefix))
    return rows, starts


class WorkbenchHarnessLM(LM):
    """A workbench run (folder or checkpoint file) as an lm-evaluation-harness model (see the module docstring)."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
                            ) -> WorkbenchHarnessLM:
        """The harness passes its --device/--batch_size beside --model_args; --model_args wins, unset flags
        (None) are dropped."""
        merged = {key: value for key, value in (additional_config or {}).items() if value is not None}
        merged.update(arg_dict)
        return cls(**merged)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None
                               ) -> WorkbenchHarnessLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(self, run: str, device: str = "auto", scorer: str = "auto", samples: int = 32,
                 masking: str = "exact", batch_size: int | str = 64, seed: int = 1234, mdm_steps: int | None = None,
                 max_gen_toks: int = 64, **_: Any) -> None:
        super().__init__()
        from workbench.evaluation.checkpoint import load_run
        from workbench.evaluation.scoring import resolve_scorer

        self._device = torch_device(device)
        self.loaded = load_run(run, self._device)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.objective = self.loaded.config.objective.name
        self.scorer = resolve_scorer(scorer, self.objective, bool(self.model.shifted))
        self.samples, self.masking, self.seed = int(samples), masking, int(seed)
        self.rows_per_forward = int(batch_size) if str(batch_size).isdigit() else 64
        self.seq_len = self.loaded.config.data.seq_len
        self.mdm_steps, self.max_gen_toks = mdm_steps, int(max_gen_toks)

    # -- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, rows: list[list[int]], starts: list[int], keys: list[int]) -> list[tuple[float, bool]]:
        """(log-likelihood or its ELBO estimate, greedy) per row, in chunks of similar length."""
        from workbench.evaluation.scoring import Rows, score_rows

        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for begin in range(0, len(order), ROWS_PER_CHUNK):
            ids = order[begin:begin + ROWS_PER_CHUNK]
            batch = Rows.from_lists([rows[i] for i in ids], [starts[i] for i in ids], [keys[i] for i in ids],
                                    pad_id=self.tokenizer.eos_id, device=self._device)
            scores = score_rows(self.model.net, batch, self.scorer, mask_id=self.model.mask_id,
                                shifted=bool(self.model.shifted), subs=bool(getattr(self.model, "subs", True)),
                                vocab_size=self.model.vocab_size, samples=self.samples,
                                rows_per_forward=self.rows_per_forward, seed=self.seed, masking=self.masking,
                                prefix=self.objective == "prefix_lm", greedy=True)
            for j, i in enumerate(ids):
                out[i] = (float(scores.logprob[j]), bool(scores.greedy[j]))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(request.args) for request in requests]
        rows, starts = request_rows(self.tokenizer, pairs, self.seq_len)
        keys = [zlib.crc32(context.encode()) & 0x7FFFFFFF for context, _ in pairs]  # choices share noise
        return self.score(rows, starts, keys)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        rows, starts, owners = [], [], []
        for number, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0])
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.tokenizer.eos_id,
                                                    max_seq_len=self.seq_len - 1, context_len=1):
                context, target = make_disjoint_window(window)
                rows.append([*context, *target])
                starts.append(len(context))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(rows, starts, owners)):
            totals[owner] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from workbench.evaluation.generate import sample_ar, sample_mdm

        outputs = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = max(1, min(int(options.get("max_gen_toks", self.max_gen_toks)), self.seq_len - 1))
            prompt = [self.tokenizer.eos_id, *self.tokenizer.encode(context)][-(self.seq_len - new):]
            prefix = torch.tensor([prompt], device=self._device)
            common = {"vocab_size": self.model.vocab_size, "mask_id": self.model.mask_id, "top_k": 1}
            if self.scorer == "ar":
                tokens = sample_ar(self.model.net, prefix, len(prompt) + new, **common)
            else:
                generator = torch.Generator(device=self._device).manual_seed(self.seed)  # which positions open
                tokens = sample_mdm(self.model.net, prefix, len(prompt) + new, self.mdm_steps or new,
                                    shifted=bool(self.model.shifted), generator=generator, **common).tokens
            text = self.tokenizer.decode(tokens[0, len(prompt):].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            outputs.append(text)
        return outputs

    @property
    def tokenizer_name(self) -> str:
        return f"workbench-{self.tokenizer.kind}-{self.tokenizer.sha256[:12]}"


if __name__ != "__main__":  # run as a script, main() imports this module by name, which registers it once
    register_model(MODEL_NAME)(WorkbenchHarnessLM)


# ------------------------------------------------------------------------------------------------------------
# workbench eval RUN --harness TASK...


@contextlib.contextmanager
def _light_env_info() -> Iterator[None]:
    """simple_evaluate records torch's collect_env report: ~20 shell commands (pip list, nvidia-smi, ...), each a
    fork of this many-threaded process (polars, tokio, jemalloc threads), which once left a child deadlocked
    before its exec in the test suite. In-process evaluations record the versions without it."""
    import lm_eval.evaluator

    original = lm_eval.evaluator.add_env_info

    def versions_only(storage: dict[str, Any]) -> None:
        from importlib.metadata import version

        storage.update({"pretty_env_info": f"torch {torch.__version__} (collect_env skipped by workbench)",
                        "lm_eval_version": version("lm_eval"), "transformers_version": "not used"})

    lm_eval.evaluator.add_env_info = versions_only
    # the harness bootstraps the stderr of perplexity-like metrics in a fork-based multiprocessing.Pool: forking
    # this many-threaded process deadlocked the suite (pytest hung in Pool.join under lambada's perplexity);
    # threads run the same bootstrap without forking (ThreadPool has the same imap API)
    import multiprocessing
    import multiprocessing.pool

    original_pool = multiprocessing.Pool
    multiprocessing.Pool = multiprocessing.pool.ThreadPool
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = original
        multiprocessing.Pool = original_pool


def task_manager(include: list[str] | None = None, defaults: bool = True):
    """The harness's task index with the workbench's offline ``wb_*`` tasks added (``defaults``: also the
    harness's own thousands of task YAMLs, which take tens of seconds to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(HARNESS_TASKS), *(include or [])], include_defaults=defaults)


def evaluate(run: str, tasks: list[str], limit: int | None = None, model_args: dict[str, Any] | None = None,
             num_fewshot: int | None = None, log_samples: bool = False, include: list[str] | None = None,
             samples: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``run`` on ``tasks`` (wb_* or any harness task the machine can load);
    ``limit``: the first N documents, or ``samples``: the document ids per task."""
    from lm_eval import simple_evaluate

    manager = task_manager(include, defaults=bool(include) or not all(t.startswith("wb_") for t in tasks))
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:  # before the checkpoint is loaded
        from workbench.config import ConfigError

        offline = ", ".join(sorted(path.stem for path in HARNESS_TASKS.glob("wb_*.yaml")))
        raise ConfigError("command line", "--harness", f"unknown harness task(s) {', '.join(unknown)}; the "
                          f"workbench's offline tasks: {offline}")
    model = WorkbenchHarnessLM(run, **(model_args or {}))
    with _light_env_info():
        results = simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, samples=samples,
                                  task_manager=manager, log_samples=log_samples, bootstrap_iters=1000)
    results["workbench_model"] = model
    return results


def tidy_rows(results: dict[str, Any], loaded, seconds: float) -> list[dict[str, Any]]:
    """Harness results -> tidy rows (split = harness task, metric = the harness's name without its filter
    ``,none``; stderr rows as ``<metric>_stderr``)."""
    from workbench.evaluation.cli import tidy_row

    rows = []
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name == "none" else f"{metric}/{filter_name}"
            rows.append(tidy_row(loaded, task, name, float(value), seconds))
    return rows


def run_cli(args: argparse.Namespace) -> int:
    """``workbench eval RUN --harness TASK,...``: print the harness table, append tidy rows to downstream.parquet."""
    from lm_eval.utils import make_table

    from workbench.evaluation.cli import DOWNSTREAM_FILE, tidy_file

    tasks = [t.strip() for item in args.harness for t in item.split(",") if t.strip()]
    limit = None if args.limit is None or str(args.limit).lower() in ("all", "none") else int(args.limit)
    model_args: dict[str, Any] = {"device": args.device}
    for flag, key in (("scorer", "scorer"), ("samples", "samples"), ("masking", "masking"),
                      ("batch_size", "batch_size"), ("seed", "seed")):
        if getattr(args, flag, None) is not None:
            model_args[key] = getattr(args, flag)
    start = time.time()
    results = evaluate(args.checkpoint, tasks, limit, model_args, num_fewshot=args.num_fewshot)
    seconds = time.time() - start
    model = results.pop("workbench_model")
    loaded = model.loaded
    bound = " (MC-ELBO: a lower bound on the log-likelihood)" if model.scorer == "mc-elbo" else ""
    print(f"[eval] lm-evaluation-harness, {loaded.config.name} ({model.objective}, scorer {model.scorer}{bound}) "
          f"at step {loaded.step}")
    print(make_table(results))
    out = Path(args.out) if args.out else loaded.run_dir / DOWNSTREAM_FILE
    rows = tidy_rows(results, loaded, seconds)
    settings = {task: {"harness": True, "scorer": model.scorer, "samples": model.samples, "limit": limit,
                       "num_fewshot": args.num_fewshot, "checkpoint": str(loaded.checkpoint), "step": loaded.step}
                for task in results["results"]}
    writer = tidy_file(out, {"workbench.config": loaded.config.to_dict(), "workbench.downstream": settings})
    writer.replace(rows)
    writer.flush()
    print(f"[eval] {len(rows)} rows -> {out}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """The harness's own CLI with the ``workbench`` model registered (and the wb_* tasks on the include path
    unless ``--include_path`` is given)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and not any(a.startswith("--include_path=") for a in argv) and \
            any(a in ("run", "--tasks", "ls", "validate") or a.startswith("--tasks=") for a in argv):
        argv += ["--include_path", str(HARNESS_TASKS)]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    from workbench.evaluation.harness import main as registered_main

    registered_main()
