"""Training throughput of a hand-written PyTorch loop vs. the workbench trainer, side by side (``workbench bench``;
its command line is workbench.commands.bench).

Both train the same :class:`workbench.model.Transformer` shape on random tokens, in one process, with the same
precision (bf16 autocast on CUDA, fp32 on CPU), optimizer (AdamW, fused on CUDA) and optional torch.compile.
The reference loop is forward -> cross-entropy -> backward -> step with no framework; the workbench path is
``workbench.train.build_run`` (Composer Trainer, Streaming MDS shards, the objective, algorithms, metrics
logging) — exactly what ``workbench train`` runs. Reported per row: tokens/s over the timed steps (after
warm-up/compilation), model-FLOPs utilisation against a matmul peak measured here, the ratio to the reference,
and peak memory. Also measured: the Streaming data path alone (tokens/s it can deliver), each algorithm's
overhead on a training step, and downstream-evaluation items/s per scorer.

Model FLOPs per token (Kaplan et al. 2020; PaLM appendix B): 6 N + 6 n_layers * seq_len * d_model for forward +
backward, N = non-embedding parameters plus the output head.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

SHAPES = {
    # name: (n_layers, d_model, n_heads, vocab_size, seq_len, batch_size)
    "micro": (1, 32, 2, 256, 32, 4),  # CI smoke only
    "tiny": (2, 128, 4, 4096, 128, 16),
    "gpt2-1024": (12, 768, 12, 50257, 1024, 32),
    "gpt2-128": (12, 768, 12, 50257, 128, 256),
}


@dataclass
class Shape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    seq_len: int
    batch_size: int

    @classmethod
    def named(cls, name: str) -> Shape:
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
        return cls(name, *SHAPES[name])

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


@dataclass
class VocabIds:
    """Stands in for a tokenizer when training on random tokens: only the ids the trainer needs."""

    vocab_size: int
    eos_id: int
    mask_id: int


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_flops(device: str) -> float:
    """Measured dense matmul throughput (bf16 on CUDA, fp32 on CPU), FLOP/s."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    repeats = 20 if device == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def model_flops_per_token(net, shape: Shape) -> float:
    n = net.num_params(non_embedding=True) + net.head.weight.numel()
    return 6 * n + 6 * shape.n_layers * shape.seq_len * shape.d_model


def _transformer(shape: Shape, device: str):
    import torch

    from workbench.model import Transformer, TransformerConfig

    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=shape.vocab_size + 1, max_seq_len=shape.seq_len,
                                         n_layers=shape.n_layers, d_model=shape.d_model,
                                         n_heads=shape.n_heads)).to(device)


def reference_loop(shape: Shape, device: str, steps: int, warmup: int, compile_model: bool) -> dict[str, Any]:
    """The plain PyTorch loop: the yardstick the trainer is compared with."""
    import torch
    import torch.nn.functional as F

    net = _transformer(shape, device)
    if compile_model:
        net.compile()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device == "cuda")
    batches = torch.randint(0, shape.vocab_size, (4, shape.batch_size, shape.seq_len), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        tokens = batches[step % 4]
        with autocast:
            logits = net(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"path": "reference loop", "tokens_per_s": steps * shape.tokens_per_step / elapsed,
            "flops_per_token": model_flops_per_token(net, shape), "peak_memory_gb": _peak_memory(device)}


def _peak_memory(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def write_random_shards(shape: Shape, folder: Path, sequences: int) -> Any:
    """Random-token MDS shards plus manifests in the layout :func:`datasets_prep.corpus.prepare` returns."""
    import numpy as np
    from streaming import MDSWriter

    from datasets_prep.corpus import PreparedData, PreparedSplit

    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", sequences), ("val", max(shape.batch_size, 8))):
        path = folder / split
        dtype = "uint16" if shape.vocab_size + 1 <= 65536 else "uint32"
        with MDSWriter(out=str(path), columns={"tokens": f"ndarray:{dtype}"}, compression=None) as writer:
            for row in rng.integers(1, shape.vocab_size, (count, shape.seq_len)).astype(dtype):
                writer.write({"tokens": row})
        splits[split] = PreparedSplit(path, {"num_tokens": count * shape.seq_len, "num_sequences": count})
    return PreparedData(splits["train"], splits["val"], VocabIds(shape.vocab_size + 1, 0, shape.vocab_size))


def workbench_trainer(shape: Shape, device: str, steps: int, warmup: int, compile_model: bool, objective: str,
                      algorithms: dict[str, Any], prepared: Any, work: Path) -> dict[str, Any]:
    """``workbench train``'s own code path on random shards; timed between batch ends after warm-up."""
    from composer.core import Callback

    from workbench.config import config_from_dict
    from workbench.train import build_run

    class Stopwatch(Callback):
        def __init__(self) -> None:
            self.start = self.elapsed = 0.0

        def batch_end(self, state, logger) -> None:
            batch = int(state.timestamp.batch)
            if batch == warmup:
                _sync(device)
                self.start = time.perf_counter()
            elif batch == warmup + steps:
                _sync(device)
                self.elapsed = time.perf_counter() - self.start

    name = f"bench-{objective}-{'-'.join(algorithms) or 'plain'}"
    config = config_from_dict({
        "name": name,
        "data": {"seq_len": shape.seq_len, "batch_size": shape.batch_size, "unique_tokens": prepared.train.manifest[
            "num_tokens"], "num_workers": 2 if device == "cuda" else 0},  # on a GPU, batches load beside the step
        "model": {"n_layers": shape.n_layers, "d_model": shape.d_model, "n_heads": shape.n_heads,
                  "compile": compile_model},
        "objective": {"name": objective},
        "optimizer": {"lr": 1e-4},
        "scheduler": {"name": "constant", "warmup": "0ba"},
        "algorithms": algorithms,
        "eval": {"interval": "1000000ba", "batch_size": shape.batch_size},
        "trainer": {"max_duration": f"{warmup + steps}ba", "progress_bar": False, "grad_clip_norm": None,
                    "checkpoint_interval": "1000000ba", "log_interval": 50},
    }, "bench")
    stopwatch = Stopwatch()
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    built = build_run(config, work / name, extra_callbacks=[stopwatch], log=lambda _: None, prepared=prepared)
    built.trainer.fit()
    built.trainer.close()
    label = objective + "".join(f" + {a}" for a in algorithms)
    return {"path": f"workbench train ({label})", "tokens_per_s": steps * shape.tokens_per_step / stopwatch.elapsed,
            "flops_per_token": model_flops_per_token(built.model.net, shape), "peak_memory_gb": _peak_memory(device)}


def data_path_throughput(prepared: Any, shape: Shape, batches: int) -> float:
    """Tokens/s the Streaming loader delivers on its own (shuffled, collated, as in training)."""
    from workbench.data import build_loader

    with tempfile.TemporaryDirectory() as view:
        spec = build_loader(prepared.train.path, shape.batch_size, shuffle=True, seed=0, view=view)
        iterator, seen = iter(spec.dataloader), 0
        start = time.perf_counter()
        while seen < batches:
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(spec.dataloader)
                continue
            seen += 1
        elapsed = time.perf_counter() - start
    return batches * batch["tokens"].numel() / elapsed


ALGORITHM_CASES = {
    "token_masking": {"token_masking": {"rate": 0.15}},
    "dropout": {"dropout": {"mlp": 0.1, "attention": 0.1}},
    "weight_decay": {"weight_decay": {"value": 0.1, "schedule": "cosine"}},
}


def run_benchmark(shape_name: str, device: str, steps: int, warmup: int, compile_model: bool,
                  with_algorithms: bool, with_eval: bool, host_repeats: int = 5) -> dict[str, Any]:
    """``host_repeats``: runs of each host-time measurement; the best is reported (see
    :func:`workbench.host_time.best_host_times`); 0 skips it."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="The warmup duration is 0")  # the bench times a constant LR

    shape = Shape.named(shape_name)
    peak = matmul_peak_flops(device)
    rows = [reference_loop(shape, device, steps, warmup, compile_model)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sequences = max(4 * shape.batch_size, (warmup + steps) * shape.batch_size)
        prepared = write_random_shards(shape, work / "shards", sequences)
        for objective in ("ar", "mdm"):
            rows.append(workbench_trainer(shape, device, steps, warmup, compile_model, objective, {}, prepared, work))
        if with_algorithms:
            for algorithm in ALGORITHM_CASES.values():
                rows.append(workbench_trainer(shape, device, steps, warmup, compile_model, "ar", algorithm,
                                              prepared, work))
            rows.append(workbench_trainer(shape, device, steps, warmup, compile_model, "dual", {}, prepared, work))
        data_tokens_per_s = data_path_throughput(prepared, shape, batches=max(steps, 20))
    reference = rows[0]["tokens_per_s"]
    for row in rows:
        row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
        row["vs_reference"] = row["tokens_per_s"] / reference
    result: dict[str, Any] = {
        "date": date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "shape": shape.__dict__, "steps": steps, "warmup": warmup,
        "compile": compile_model, "matmul_peak_tflops": peak / 1e12, "rows": rows,
        "data_path_tokens_per_s": data_tokens_per_s,
        "data_path_vs_model": data_tokens_per_s / max(r["tokens_per_s"] for r in rows),
    }
    # the framework's fixed host time per step, Composer's loop vs. the workbench's (CPU, micro model, one thread)
    from workbench.host_time import best_host_times

    if host_repeats > 0:
        result["host_time"] = best_host_times([("composer", 0), ("workbench", 0), ("workbench", 2)], host_repeats)
    if with_eval:
        from workbench.evaluation.bench import eval_throughput

        # 32 items on a GPU; 8 on a CPU, where 128 MC samples of 4 choices over a 50k-word head take minutes
        result["eval"] = eval_throughput(device, items=32 if device == "cuda" else 8, samples=(32, 128))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"device: {result['device']} | torch {result['torch']} | shape {result['shape']['name']} "
             f"(L={result['shape']['seq_len']}, batch={result['shape']['batch_size']}) | compile={result['compile']}"
             f" | matmul peak {result['matmul_peak_tflops']:.2f} TFLOP/s",
             f"{'path':44s} {'tokens/s':>12s} {'MFU':>7s} {'x ref':>7s} {'peak GB':>8s}"]
    for row in result["rows"]:
        memory = f"{row['peak_memory_gb']:.2f}" if row["peak_memory_gb"] is not None else "-"
        lines.append(f"{row['path']:44s} {row['tokens_per_s']:12,.0f} {row['mfu']:7.1%} {row['vs_reference']:7.3f} "
                     f"{memory:>8s}")
    lines.append(f"Streaming data path alone: {result['data_path_tokens_per_s']:,.0f} tokens/s "
                 f"({result['data_path_vs_model']:.1f}x the fastest model path)")
    if "host_time" in result:
        before, after, workers = result["host_time"]
        lines.append(f"framework host time per step (CPU time outside forward/backward/optimizer; micro model, one "
                     f"thread; best of {len(after['host_ms_runs'])}): Composer's loop {before['host_ms']:.2f} ms -> "
                     f"workbench loop {after['host_ms']:.2f} ms reading in-process, {workers['host_ms']:.2f} ms with "
                     f"{workers['num_workers']} loader workers (the GPU configs' setting); target <= 1 ms")
    for row in result.get("eval", []):
        samples = row.get("samples", "-")
        lines.append(f"eval {row['scorer']:>10s} ({samples} samples): {row['items_per_s']:,.1f} items/s")
    return "\n".join(lines)
