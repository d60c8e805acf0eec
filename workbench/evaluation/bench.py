"""Throughput of the downstream scorers: items per second for each scorer on real task items, with a tiny
random-init model (the numbers measure the scoring machinery, not a model's accuracy). A benchmark, not a test;
run through ``workbench bench --eval``.

Reported per scorer: items/s and network rows/s (a row is one (item, choice) sequence for ar; one (item, choice,
sample) for mc-elbo; one (item, choice, continuation token) for chain and pll), with the model size. On GPU the
forward passes run under bf16 autocast, as in training.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from workbench.devices import resolve_device

BENCH_MODEL = {"n_layers": 2, "d_model": 128, "n_heads": 4}


def scorer_runs(samples: Sequence[int]) -> list[tuple[str, str, str, float, int]]:
    """(label, scorer, model objective, cfg_weight, samples): every scorer, MC-ELBO at each sample count."""
    runs = [("ar", "ar", "ar", 0.0, 1)]
    runs += [("mc-elbo", "mc-elbo", "mdm", 0.0, n) for n in samples]
    runs += [("mc-elbo+cfg", "mc-elbo", "mdm", 1.0, samples[0]), ("chain", "chain", "mdm", 0.0, 1),
             ("pll", "pll", "mdm", 0.0, 1)]
    return runs


def tiny_model(tokenizer, seq_len: int, objective: str, device: str):
    """A random-init model of the benchmark size with its objective installed (AR shifted, MDM unshifted)."""
    from workbench.config import config_from_dict
    from workbench.train import build_model

    config = config_from_dict({"data": {"seq_len": seq_len}, "model": BENCH_MODEL, "objective": {"name": objective}},
                              "bench")
    torch.manual_seed(0)
    return build_model(config, tokenizer, install_objective=True).to(device).eval()


def _forward_rows(task, scorer: str, samples: int) -> int:
    rows = sum(len(item.rows) for item in task.items)
    if scorer == "ar":
        return rows
    if scorer == "mc-elbo":
        return rows * samples
    return sum(len(row) - start for item in task.items for row, start in zip(item.rows, item.cont_start))


def eval_throughput(device: str = "cpu", task: str = "hellaswag", items: int = 32, samples: Sequence[int] = (32, 128),
                    seq_len: int = 128, rows_per_forward: int = 64, log=print) -> list[dict[str, Any]]:
    """Items/s of every scorer on ``items`` real items of ``task``; prints a line per scorer and returns dicts."""
    from workbench.config import DownstreamConfig, TokenizerConfig
    from workbench.evaluation.tasks import evaluate_task, prepare_task
    from workbench.tokenizer import load_tokenizer

    device = resolve_device(device)
    tokenizer = load_tokenizer(TokenizerConfig(kind="gpt2"))
    autocast = torch.bfloat16 if device == "cuda" else None
    models: dict[str, Any] = {}
    results = []
    for label, scorer, objective, cfg_weight, n in scorer_runs(samples):
        if objective not in models:
            models[objective] = tiny_model(tokenizer, seq_len, objective, device)
        model = models[objective]
        cfg = DownstreamConfig(tasks=[task], limit=items, scorer=scorer, samples=n, batch_size=rows_per_forward,
                               cfg_weight=cfg_weight)
        prepared = prepare_task(task, tokenizer, cfg, seq_len)
        warm = DownstreamConfig(tasks=[task], limit=2, scorer=scorer, samples=n, batch_size=rows_per_forward,
                                cfg_weight=cfg_weight)
        evaluate_task(model, prepare_task(task, tokenizer, warm, seq_len), device, autocast)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        evaluate_task(model, prepared, device, autocast)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        forward_rows = _forward_rows(prepared, scorer, n)
        result = {"device": device, "task": task, "scorer": label, "items": len(prepared.items),
                  "samples": n if scorer == "mc-elbo" else None, "seconds": seconds,
                  "items_per_s": len(prepared.items) / seconds, "rows_per_s": forward_rows / seconds,
                  "params": model.net.num_params(non_embedding=False),
                  "non_embedding_params": model.net.num_params(), "seq_len": seq_len,
                  "model": f"{BENCH_MODEL['n_layers']}x{BENCH_MODEL['d_model']}, vocab {tokenizer.vocab_size}"}
        results.append(result)
        shown = f"{label}({n})" if scorer == "mc-elbo" else label
        log(f"[bench] {device} {task} {shown:16s} {result['items_per_s']:9.2f} items/s "
            f"{result['rows_per_s']:10.1f} rows/s  ({result['items']} items in {seconds:.2f}s; model "
            f"{result['model']}, {result['params'] / 1e6:.1f}M params, {result['non_embedding_params'] / 1e6:.2f}M "
            "non-embedding)")
    return results
