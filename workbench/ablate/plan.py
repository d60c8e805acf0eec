"""The plan: each run's state (new, resume, complete, changed), its training tokens, the time estimate
(measured tokens/s of runs of the same shape, else a short probe) and the table printed before anything runs."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from workbench import claims
from workbench.ablate.spec import Ablation, PlannedRun, format_count
from workbench.config import RunConfig
from workbench.durations import epoch_tokens, split_duration
from workbench.progress import format_seconds
from workbench.tokenizer import vocab_size_of

STARTUP_S = 5.0  # per-run start-up (imports, model and trainer construction) measured for tiny models on CPU


def assess(runs: list[PlannedRun]) -> None:
    """Set each run's state: new, resume, complete or changed (a different config in its folder)."""
    from workbench.results import read_summary
    from workbench.train import RunExistsError, check_run_dir

    for run in runs:
        try:
            run.state = check_run_dir(run.config, run.run_dir, resume=True)
        except RunExistsError as err:
            run.state, run.detail = "changed", str(err)
            continue
        if run.state == "resume":
            summary = read_summary(run.run_dir) or {}
            run.detail = f"was {summary.get('status', 'unknown')}"
        holder = claims.current(run.run_dir)
        if holder is not None and claims.alive(holder[1]):
            run.detail = ", ".join(filter(None, [run.detail, f"held by {claims.describe(holder[1])}"]))


def planned_epochs(config: RunConfig) -> float:
    """Epochs of the unique-token budget a run will see (from trainer.max_duration)."""
    data = config.data
    return split_duration(config.trainer.max_duration).epochs(epoch_tokens(data.unique_tokens, data.seq_len),
                                                              data.seq_len, data.batch_size)


def planned_tokens(config: RunConfig) -> int:
    return round(planned_epochs(config) * epoch_tokens(config.data.unique_tokens, config.data.seq_len))


def _eval_passes(config: RunConfig) -> float:
    """How many validation passes a run makes (Composer also evaluates at the end)."""
    interval = split_duration(config.eval.interval)
    if interval.unit == "dur":
        return 1.0 / interval.amount if interval.amount else 1.0
    data = config.data
    unique = epoch_tokens(data.unique_tokens, data.seq_len)
    per_epoch = 1 / interval.epochs(unique, data.seq_len, data.batch_size)
    return max(1.0, math.floor(planned_epochs(config) * per_epoch + 1e-9))


def shape_key(config: RunConfig) -> tuple:
    """Runs with equal keys train at the same speed (objectives and regularizers cost about the same)."""
    m, d = config.model, config.data
    return (m.n_layers, m.d_model, m.n_heads, m.mlp_ratio, d.seq_len, d.batch_size, vocab_size_of(d.tokenizer),
            config.trainer.precision, config.trainer.device)


def measured_throughput(root: Path, runs: list[PlannedRun]) -> dict[tuple, tuple[float, int]]:
    """shape key -> (median tokens/s, number of rows) from the metrics of runs already in ``root``."""
    import warnings

    import polars as pl

    from workbench.results import CHECKPOINTS, METRICS_FILE, read_metrics

    keys = {run.run_dir.resolve(): shape_key(run.config) for run in runs}
    by_key: dict[tuple, list[float]] = {}
    for path in sorted(root.rglob(METRICS_FILE)) if root.is_dir() else []:
        if CHECKPOINTS in path.parts:
            continue
        key = keys.get(path.parent.resolve())
        if key is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = read_metrics(path)
        if frame is None:
            continue
        values = frame.filter((pl.col("split") == "train") & (pl.col("metric") == "tokens_per_s"))["value"]
        by_key.setdefault(key, []).extend(values.to_list())
    return {key: (float(sorted(v)[len(v) // 2]), len(v)) for key, v in by_key.items() if v}


def probe_throughput(config: RunConfig, steps: int = 4, threads: int | None = None) -> float:
    """Tokens/s of a few AdamW steps of this model on random tokens (no data preparation needed)."""
    import torch

    from workbench.devices import resolve_device
    from workbench.model import Transformer, TransformerConfig
    from workbench.objectives import ar_loss

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # a planning machine without the run's GPU still gets an estimate (the run itself refuses to start there)
        device = resolve_device("cpu" if config.trainer.device == "cpu" else "auto")
        vocab = vocab_size_of(config.data.tokenizer)
        net = Transformer(TransformerConfig(vocab_size=vocab, max_seq_len=config.data.seq_len,
                                            n_layers=config.model.n_layers, d_model=config.model.d_model,
                                            n_heads=config.model.n_heads, mlp_ratio=config.model.mlp_ratio,
                                            attention="sdpa")).to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        batch = min(config.data.batch_size, config.trainer.microbatch_size or config.data.batch_size)
        tokens = torch.randint(0, vocab, (batch, config.data.seq_len), device=device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32

        def step() -> None:
            with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
                loss = ar_loss(net, tokens)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return steps * tokens.numel() / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def _tokens_done(run: PlannedRun) -> int:
    """Training tokens an interrupted run already has (resume continues from its latest checkpoint)."""
    import warnings

    from workbench.results import METRICS_FILE, read_metrics

    if run.state != "resume" or not (run.run_dir / METRICS_FILE).is_file():
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = read_metrics(run.run_dir / METRICS_FILE)
    return int(frame["tokens_seen"].max() or 0) if frame is not None and frame.height else 0


def estimate(ablation: Ablation, root: Path, parallel: int, probe: bool = True) -> tuple[dict[str, float], str]:
    """Seconds per run name still to train (complete runs: 0), and where the tokens/s came from."""
    measured = measured_throughput(root, ablation.runs)
    pending = [run for run in ablation.runs if run.state in ("new", "resume")]
    speeds: dict[tuple, float] = {}
    sources: list[str] = []
    for run in pending:
        key = shape_key(run.config)
        if key in speeds:
            continue
        if key in measured:
            speeds[key] = measured[key][0]
            sources.append(f"median of {measured[key][1]} 'tokens_per_s' rows in {root / ablation.name}")
        elif probe:
            threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
            speeds[key] = probe_throughput(run.config, threads=threads)
            sources.append(f"a 4-step probe of the {run.config.model.n_layers}x{run.config.model.d_model} model on "
                           "this machine")
    seconds: dict[str, float] = {}
    for run in ablation.runs:
        if run.state not in ("new", "resume") or shape_key(run.config) not in speeds:
            seconds[run.name] = 0.0
            continue
        speed = speeds[shape_key(run.config)]
        metrics = run.config.eval_metrics  # forward passes per validation token: 1 for ar_nll, K for the NELBO
        forwards = ("ar_nll" in metrics) + run.config.eval.nelbo_samples * ("mdm_nelbo" in metrics)
        eval_tokens = _eval_passes(run.config) * run.config.data.val_tokens * forwards
        remaining = max(0.0, 1.0 - _tokens_done(run) / max(1, planned_tokens(run.config)))
        seconds[run.name] = remaining * (planned_tokens(run.config) / speed + eval_tokens / (3 * speed)) + STARTUP_S
    if not pending:
        source = "nothing left to train"
    elif not speeds:
        source = "nothing: no measured runs of this shape and the probe is off"
    else:
        source = "; ".join(dict.fromkeys(sources))
    return seconds, source


def format_plan(ablation: Ablation, seconds: dict[str, float] | None, source: str, parallel: int) -> str:
    """The plan table printed before anything runs."""
    header = f"ablation {ablation.name} ({ablation.path}{f', {ablation.scale} scale' if ablation.scale else ''})"
    lines = [header]
    if ablation.description:
        lines.append(f"  {ablation.description}")
    columns = ["variant", "seed", "objective", "unique", "epochs", "tokens", "state", "estimate"]
    rows = []
    total_tokens = 0
    for run in ablation.runs:
        tokens = planned_tokens(run.config)
        total_tokens += tokens
        state = run.state + (f" ({run.detail})" if run.detail and run.state in ("new", "resume") else "")
        rows.append([run.variant.name, str(run.seed), run.config.objective.name,
                     format_count(run.config.data.unique_tokens), f"{planned_epochs(run.config):g}",
                     format_count(tokens), state.upper() if run.state == "changed" else state,
                     format_seconds(seconds[run.name]) if seconds and seconds.get(run.name) else "-"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.extend("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows)
    counts = {s: sum(r.state == s for r in ablation.runs) for s in ("new", "resume", "complete", "changed")}
    lines.append(f"{len(ablation.runs)} runs ({len(ablation.variants)} variants x {len(ablation.seeds)} seeds), "
                 f"{format_count(total_tokens)} training tokens; " + ", ".join(f"{n} {s}" for s, n in counts.items()
                                                                                if n))
    if seconds is None or not counts["new"] + counts["resume"]:
        pass
    elif not any(seconds.values()):
        lines.append(f"estimated time: unknown; tokens/s from {source}")
    else:
        total = sum(seconds.values())
        wall = total / max(1, parallel)
        lines.append(f"estimated time: {format_seconds(wall)}" + (f" ({format_seconds(total)} of runs / {parallel} "
                     "at once)" if parallel > 1 else "") + f"; tokens/s from {source}")
    return "\n".join(lines)

