"""Throughput of the downstream scorers: items per second for each scorer on real task items, with a tiny
random-init model (the numbers measure the scoring machinery, not a model's accuracy). A benchmark, not a test.

    python -m workbench.evaluation.bench [--device cpu|cuda] [--task hellaswag] [--items 32] [--samples 16]

Reported per scorer: items/s and network rows/s (a row is one (item, choice) sequence for ar; one (item, choice,
sample) for mc-elbo; one (item, choice, continuation token) for chain and pll), with the model size. On GPU the
forward passes run under bf16 autocast, as in training.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

BENCH_MODEL = {"n_layers": 2, "d_model": 128, "n_heads": 4}
SCORER_RUNS = (  # (label, scorer, model objective, cfg_weight)
    ("ar", "ar", "ar", 0.0),
    ("mc-elbo", "mc-elbo", "mdm", 0.0),
    ("mc-elbo+cfg", "mc-elbo", "mdm", 1.0),
    ("chain", "chain", "mdm", 0.0),
    ("pll", "pll", "mdm", 0.0),
)


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


def eval_throughput(device: str = "cpu", task: str = "hellaswag", items: int = 32, samples: int = 16,
                    seq_len: int = 128, rows_per_forward: int = 64, log=print) -> list[dict[str, Any]]:
    """Items/s of every scorer on ``items`` real items of ``task``; prints a line per scorer and returns dicts."""
    from workbench.config import DownstreamConfig, TokenizerConfig
    from workbench.evaluation.tasks import evaluate_task, prepare_task
    from workbench.tokenizer import load_tokenizer

    device = "cuda" if device in ("gpu", "cuda") else device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device available")
    tokenizer = load_tokenizer(TokenizerConfig(kind="gpt2"))
    autocast = torch.bfloat16 if device == "cuda" else None
    models: dict[str, Any] = {}
    results = []
    for label, scorer, objective, cfg_weight in SCORER_RUNS:
        if objective not in models:
            models[objective] = tiny_model(tokenizer, seq_len, objective, device)
        model = models[objective]
        cfg = DownstreamConfig(tasks=[task], limit=items, scorer=scorer, samples=samples, batch_size=rows_per_forward,
                               cfg_weight=cfg_weight)
        prepared = prepare_task(task, tokenizer, cfg, seq_len)
        warm = DownstreamConfig(tasks=[task], limit=2, scorer=scorer, samples=samples, batch_size=rows_per_forward,
                                cfg_weight=cfg_weight)
        evaluate_task(model, prepare_task(task, tokenizer, warm, seq_len), device, autocast)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        evaluate_task(model, prepared, device, autocast)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        forward_rows = _forward_rows(prepared, scorer, samples)
        result = {"device": device, "task": task, "scorer": label, "items": len(prepared.items),
                  "samples": samples if scorer == "mc-elbo" else None, "seconds": seconds,
                  "items_per_s": len(prepared.items) / seconds, "rows_per_s": forward_rows / seconds,
                  "params": model.net.num_params(non_embedding=False),
                  "non_embedding_params": model.net.num_params(), "seq_len": seq_len,
                  "model": f"{BENCH_MODEL['n_layers']}x{BENCH_MODEL['d_model']}, vocab {tokenizer.vocab_size}"}
        results.append(result)
        log(f"[bench] {device} {task} {label:12s} {result['items_per_s']:9.2f} items/s "
            f"{result['rows_per_s']:10.1f} rows/s  ({result['items']} items in {seconds:.2f}s; model "
            f"{result['model']}, {result['params'] / 1e6:.1f}M params, {result['non_embedding_params'] / 1e6:.2f}M "
            "non-embedding)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu, plus cuda when available)")
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("[bench] no CUDA device: GPU numbers skipped")
            continue
        eval_throughput(device, args.task, args.items, args.samples, args.seq_len)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
