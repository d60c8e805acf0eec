"""``workbench generate CHECKPOINT``: samples from an AR or masked-diffusion checkpoint and their generative
perplexity (the sampling itself is workbench.evaluation.generate). torch is imported in ``run`` only, so building
the ``workbench`` parser stays fast."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from workbench.devices import DEVICE_CHOICES, DEVICE_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder (uses checkpoints/latest-rank0.pt) or a .pt file in it")
    parser.add_argument("--mode", choices=["auto", "ar", "mdm"], default="auto",
                        help="auto: ar for ar/prefix_lm/dual models, mdm for masked diffusion")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--length", type=int, help="tokens per sample including the leading EOS "
                        "(default: the model's seq_len)")
    parser.add_argument("--steps", type=int, help="MDM sampling steps T (default: length)")
    parser.add_argument("--cached", action=argparse.BooleanOptionalAction, default=True,
                        help="MDM: skip forwards for rows a step left unchanged")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this much mass")
    parser.add_argument("--prompt", default="", help="text after the leading EOS, shared by all samples")
    parser.add_argument("--batch-size", type=int, default=8, help="samples generated together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ppl-model", help="AR run/checkpoint that scores the samples (generative perplexity)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    parser.add_argument("--out", help="write the samples as JSON lines to this file")
    parser.add_argument("--rows", help="tidy rows file (default <run>/downstream.parquet)")


def _check_flags(args: argparse.Namespace) -> None:
    from workbench.config import ConfigError

    checks = {"--num-samples": args.num_samples >= 1, "--batch-size": args.batch_size >= 1,
              "--steps": args.steps is None or args.steps >= 1, "--temperature": args.temperature > 0,
              "--top-k": args.top_k >= 0, "--top-p": 0 < args.top_p <= 1}
    for flag, ok in checks.items():
        if not ok:
            raise ConfigError("command line", flag, "out of range (counts >= 1, temperature > 0, top-k >= 0, "
                              "0 < top-p <= 1)")


def _mode(requested: str, objective: str) -> str:
    """auto: mdm for masked-diffusion models, else ar; a mode the model cannot sample is refused."""
    from workbench.config import ConfigError

    mode = requested if requested != "auto" else ("mdm" if objective == "mdm" else "ar")
    if mode == "ar" and objective == "mdm":
        raise ConfigError("command line", "--mode", "this is a masked-diffusion model (objective mdm): use --mode mdm")
    if mode == "mdm" and objective not in ("mdm", "dual"):
        raise ConfigError("command line", "--mode", f"--mode mdm needs a masked-diffusion model; objective is "
                          f"{objective!r}")
    return mode


def _sample(args: argparse.Namespace, model: Any, prompt: list[int], length: int, steps: int, mode: str,
            device: str) -> tuple[list[list[int]], list[int]]:
    """All samples (token ids after the leading EOS) and the forwards each needed, batch by batch with progress."""
    import torch

    from workbench.evaluation.generate import sample_ar, sample_mdm
    from workbench.progress import Progress

    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples: list[list[int]] = []
    forwards: list[int] = []
    options = {"vocab_size": model.vocab_size, "mask_id": model.mask_id, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "generator": generator}
    with Progress(args.num_samples, f"[generate] {mode}", "samples") as progress:
        for first in range(0, args.num_samples, args.batch_size):
            n = min(args.batch_size, args.num_samples - first)
            prefix = torch.tensor([prompt] * n, device=device)
            if mode == "ar":
                tokens = sample_ar(model.net, prefix, length, **options)
                forwards += [length - len(prompt)] * n
            else:
                out = sample_mdm(model.net, prefix, length, steps, shifted=bool(model.shifted), cached=args.cached,
                                 **options)
                tokens = out.tokens
                forwards += out.row_forwards.tolist()
            samples += tokens[:, 1:].tolist()  # the batch's samples are needed on the host anyway
            progress.update(n)
    return samples, forwards


def run(args: argparse.Namespace) -> int:
    from workbench.config import ConfigError
    from workbench.devices import resolve_device
    from workbench.evaluation.checkpoint import load_run
    from workbench.evaluation.cli import tidy_file, tidy_row
    from workbench.evaluation.generate import generative_perplexity, token_entropy
    from workbench.results import DOWNSTREAM_FILE

    _check_flags(args)
    device = resolve_device(args.device)
    loaded = load_run(args.checkpoint, device)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    objective = config.objective.name
    mode = _mode(args.mode, objective)
    length = args.length or config.data.seq_len
    if not 2 <= length <= config.data.seq_len:
        raise ConfigError("command line", "--length", f"must be in [2, {config.data.seq_len}] (the model's seq_len)")
    steps = args.steps or length
    prompt = [tokenizer.eos_id, *tokenizer.encode(args.prompt)] if args.prompt else [tokenizer.eos_id]
    if len(prompt) >= length:
        raise ConfigError("command line", "--prompt", f"is {len(prompt)} tokens; --length {length} leaves no room")
    scorer = load_run(args.ppl_model, device) if args.ppl_model else None
    if scorer is not None and scorer.config.objective.name == "mdm":
        raise ConfigError("command line", "--ppl-model", "generative perplexity needs an AR model (objective ar, "
                          "prefix_lm or dual), not a masked-diffusion one")
    start = time.time()
    samples, forwards = _sample(args, model, prompt, length, steps, mode, device)
    seconds = time.time() - start
    texts = [tokenizer.decode(ids) for ids in samples]
    entropies = [token_entropy(ids) for ids in samples]
    label = "generate_ar" if mode == "ar" else f"generate_mdm_T{steps}"
    print(f"[generate] {config.name} ({objective}, step {loaded.step}): {len(samples)} samples of {length} tokens, "
          f"mode {mode}" + (f", {steps} steps{' (cached)' if args.cached else ''}" if mode == "mdm" else "")
          + f" in {seconds:.1f}s")
    for i, text in enumerate(texts):
        print(f"--- sample {i} (entropy {entropies[i]:.3f}, forwards {forwards[i]})\n{text}")
    values = {"entropy": sum(entropies) / len(entropies), "forwards": sum(forwards) / len(forwards)}
    if scorer is not None:
        ppl, _, count = generative_perplexity(scorer.model, scorer.tokenizer, texts, scorer.config.data.seq_len,
                                                device)
        values["gen_ppl"] = ppl
        print(f"[generate] generative perplexity under {scorer.config.name}: {ppl:.2f} ({count} tokens)")
    print(f"[generate] mean entropy {values['entropy']:.3f}, forwards per sample {values['forwards']:.1f}")
    if args.out:
        with open(args.out, "w") as handle:
            for i, (text, ids) in enumerate(zip(texts, samples)):
                handle.write(json.dumps({"sample": i, "text": text, "tokens": ids, "entropy": entropies[i],
                                         "forwards": forwards[i]}) + "\n")
    rows_path = Path(args.rows) if args.rows else loaded.run_dir / DOWNSTREAM_FILE
    settings = {label: {"mode": mode, "steps": steps if mode == "mdm" else None, "cached": args.cached,
                        "num_samples": args.num_samples, "length": length, "temperature": args.temperature,
                        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "prompt": args.prompt,
                        "ppl_model": args.ppl_model, "checkpoint": str(loaded.checkpoint)}}
    writer = tidy_file(rows_path, {"workbench.config": config.to_dict(), "workbench.generate": settings})
    writer.replace([tidy_row(loaded, label, metric, value, seconds) for metric, value in values.items()])
    writer.flush()
    return 0
