"""Load a trained run for evaluation or sampling: the model (with its training objective installed, so scorer
``auto`` resolves), the run's tokenizer and its config.

A run folder ``results/<name>/`` holds ``config.yaml``, ``summary.json`` (``train_shards``: the prepared split
whose ``tokenizer.json`` is the run's tokenizer) and ``checkpoints/latest-rank0.pt`` (a Composer checkpoint; the
weights are ``state['model']`` with keys prefixed ``net.``). ``path`` may be the run folder or a ``.pt`` file in
its ``checkpoints/`` folder. When the prepared shards are gone, gpt2/bert tokenizers are rebuilt from their
files; the tokenizer is always checked against the one recorded in the run's metrics metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.config import RunConfig, load_run_config
from workbench.results import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metadata, read_summary
from workbench.results import LATEST_CHECKPOINT as LATEST
from workbench.resume import CheckpointError, read_checkpoint


@dataclass
class LoadedRun:
    model: Any  # workbench.lm.WorkbenchLM, in eval mode
    tokenizer: Any  # workbench.tokenizer.TextTokenizer
    config: RunConfig
    run_dir: Path
    checkpoint: Path
    step: int  # batches trained when the checkpoint was written
    tokens_seen: int
    unique_tokens: int


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint file) for a run folder or a checkpoint file inside ``<run>/checkpoints/``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint file")
    if path.is_dir():
        run_dir = path
        folder = run_dir / CHECKPOINTS
        checkpoint = folder / LATEST
        if checkpoint.is_symlink() and not checkpoint.exists():
            raise CheckpointError(f"{checkpoint} points at {folder / checkpoint.readlink()}, which no longer exists; "
                                  "name one of the checkpoint files in that folder to evaluate it")
        if not checkpoint.exists():
            candidates = sorted((p for p in folder.glob("*.pt") if p.is_file()),
                                key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
            if not candidates:
                raise FileNotFoundError(f"{run_dir}: no checkpoint found (expected {checkpoint}); is this a run "
                                        "folder of a run that saved at least one checkpoint?")
            checkpoint = candidates[-1]
    else:
        checkpoint = path
        if checkpoint.parent.name != CHECKPOINTS:
            raise FileNotFoundError(f"{checkpoint}: a checkpoint file must lie in a run's {CHECKPOINTS}/ folder "
                                    "(its config.yaml is read from the run folder)")
        run_dir = checkpoint.parent.parent
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} not found: {run_dir} is not a run folder")
    return run_dir, checkpoint


def _load_tokenizer(run_dir: Path, config: RunConfig):
    from workbench.tokenizer import from_tokenizer_json, load_tokenizer

    summary = read_summary(run_dir) or {}
    tried = []
    tokenizer = None
    for key in ("train_shards", "val_shards"):
        if summary.get(key):
            candidate = Path(summary[key]) / "tokenizer.json"
            tried.append(str(candidate))
            if candidate.is_file():
                tokenizer = from_tokenizer_json(candidate, config.data.tokenizer.kind)
                break
    if tokenizer is None:
        if config.data.tokenizer.kind == "bpe":
            where = ", ".join(tried) or f"{run_dir / SUMMARY_FILE} names no prepared shards"
            raise FileNotFoundError(f"the run's trained BPE tokenizer was not found ({where}); re-create it with "
                                    f"`workbench prep {run_dir / CONFIG_FILE}`")
        tokenizer = load_tokenizer(config.data.tokenizer)
    expected = _recorded_tokenizer(run_dir)
    if expected and expected.get("sha256") and expected["sha256"] != tokenizer.sha256:
        raise ValueError(f"{run_dir}: the tokenizer found ({tokenizer.kind}, sha256 {tokenizer.sha256[:12]}) is not "
                         f"the one the run trained with (sha256 {expected['sha256'][:12]})")
    return tokenizer


def _recorded_tokenizer(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        data = read_metadata(path).get("data") or {}
        return data["train"]["spec"]["tokenizer"]
    except (KeyError, TypeError, OSError, ValueError):
        return None


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Model, tokenizer, config and training position of a run folder or checkpoint file."""
    run_dir, checkpoint = resolve_checkpoint(path)
    config = load_run_config(run_dir / CONFIG_FILE)
    tokenizer = _load_tokenizer(run_dir, config)
    state = read_checkpoint(checkpoint)["state"]  # a truncated or corrupted file: CheckpointError naming it
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{checkpoint}: not a Composer checkpoint with state['model']")
    from workbench.train import build_model

    model = build_model(config, tokenizer, install_objective=True)
    net_state = {key.removeprefix("net.").replace("_orig_mod.", ""): value for key, value in weights.items()
                 if key.startswith("net.")}
    try:
        model.net.load_state_dict(net_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint} does not match the model of {run_dir / CONFIG_FILE}: {err}") from None
    model.to(device).eval()
    timestamp = (state.get("timestamp") or {}).get("Timestamp", {})
    summary = read_summary(run_dir) or {}
    return LoadedRun(model, tokenizer, config, run_dir, checkpoint, int(timestamp.get("batch", 0)),
                     int(timestamp.get("token", 0)), int(summary.get("unique_tokens") or config.data.unique_tokens))


def load_run_model(path: str | Path, device: str | torch.device = "cpu"):
    """(WorkbenchLM, TextTokenizer, RunConfig) of a run folder or a ``.pt`` file in its checkpoints/ folder."""
    run = load_run(path, device)
    return run.model, run.tokenizer, run.config
