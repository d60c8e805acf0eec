"""``workbench generate CHECKPOINT``: samples from AR and masked-diffusion models, and their generative perplexity.

Every sample starts at a document boundary (position 0 = EOS, as after a document in training), optionally
followed by ``--prompt``.

- AR (``--mode ar``; auto for objectives ar, prefix_lm, dual): token by token with temperature, top-k and top-p
  (nucleus) filtering; one causal forward over the prefix per token.
- MDM (``--mode mdm``; auto for objective mdm): ancestral sampling of MDLM (Sahoo et al. 2024) for the linear
  schedule alpha_t = 1 - t over T steps: from t to s = t - 1/T each masked position is revealed with probability
  (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t, its token drawn from p_theta(x | x_t) (never the mask: SUBS).
  ``--cached`` (default): the denoiser does not depend on t, so a row in which a step revealed nothing keeps its
  previous distribution instead of running a new forward (MDLM's cached sampler; same samples, fewer forwards).
  Token draws use float64 Gumbel-max: float32 categorical sampling lowers the effective temperature and flatters
  generative perplexity (Zheng et al. 2024).
- Generative perplexity (MDLM): the decoded samples are re-tokenized with the tokenizer of an AR checkpoint
  (``--ppl-model``) and scored by it, exp(total NLL / scored tokens) over windows of its length; reported with
  the mean unigram entropy of the samples' tokens (degenerate, repetitive samples have low entropy and
  misleadingly low generative perplexity).

Output: samples printed (``--out FILE`` writes them as JSON lines); tidy rows (split ``generate_ar`` or
``generate_mdm_T<steps>``, metrics ``entropy``, ``forwards`` per sample and ``gen_ppl``) go to
``<run>/downstream.parquet`` or ``--rows FILE`` (see workbench.evaluation.cli for the file's semantics).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch


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
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--out", help="write the samples as JSON lines to this file")
    parser.add_argument("--rows", help="tidy rows file (default <run>/downstream.parquet)")


# --------------------------------------------------------------------------------------------------------------
# sampling


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                  ) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering over the last dimension (-inf = excluded)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def draw(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row by float64 Gumbel-max."""
    uniform = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
    return (logits.double() + gumbel).argmax(dim=-1)


def _allowed(logits: torch.Tensor, vocab_size: int, mask_id: int) -> torch.Tensor:
    logits = logits.float()
    logits[..., vocab_size:] = float("-inf")  # padded embedding rows never occur
    logits[..., mask_id] = float("-inf")
    return logits


@torch.no_grad()
def sample_ar(net, prefix: torch.Tensor, length: int, *, vocab_size: int, mask_id: int, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``prefix`` (B, P) to (B, length) token by token (one causal forward over the prefix per token)."""
    x = prefix
    while x.shape[1] < length:
        logits = _allowed(net(x, causal=True)[:, -1], vocab_size, mask_id)
        token = draw(filter_logits(logits, temperature, top_k, top_p), generator)
        x = torch.cat([x, token[:, None]], dim=1)
    return x


@dataclass
class MDMSample:
    tokens: torch.Tensor  # (B, L)
    forwards: int  # network calls (rows x forwards would count work; this counts passes)
    row_forwards: torch.Tensor  # (B,) forwards each row needed


@torch.no_grad()
def sample_mdm(net, prefix: torch.Tensor, length: int, steps: int, *, mask_id: int, shifted: bool, vocab_size: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cached: bool = True,
               generator: torch.Generator | None = None) -> MDMSample:
    """Ancestral unmasking from ``prefix`` + masks to (B, length) in ``steps`` steps (see the module docstring)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    batch, device = prefix.shape[0], prefix.device
    x = torch.cat([prefix, torch.full((batch, length - prefix.shape[1]), mask_id, device=device)], dim=1)
    cache = None
    stale = torch.ones(batch, dtype=torch.bool, device=device)
    row_forwards = torch.zeros(batch, dtype=torch.long, device=device)
    forwards = 0
    for i in range(steps):
        masked = x == mask_id
        if not bool(masked.any()):
            break
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        reveal = masked & (torch.rand(x.shape, device=device, generator=generator) < (t - s) / t)
        # cached: only rows that changed since their last forward and reveal something now need the network
        need = stale & reveal.any(dim=1) if cached else torch.ones_like(stale)
        if cache is None or bool(need.any()):
            idx = torch.arange(batch, device=device) if cache is None else need.nonzero().squeeze(1)
            logits = net(x[idx], causal=False)
            if shifted:  # position i predicts token i+1: align so aligned[:, p] predicts token p
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            logits = _allowed(logits, vocab_size, mask_id)
            if cache is None:
                cache = logits
            else:
                cache[idx] = logits
            forwards += 1
            row_forwards[idx] += 1
            stale[idx] = False
        rows, positions = reveal.nonzero(as_tuple=True)
        if rows.numel():
            x[rows, positions] = draw(filter_logits(cache[rows, positions], temperature, top_k, top_p), generator)
            stale[rows] = True
    return MDMSample(x, forwards, row_forwards)


# --------------------------------------------------------------------------------------------------------------
# generative perplexity and entropy


def token_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the empirical unigram distribution of one sample's tokens."""
    if not ids:
        return 0.0
    counts = torch.bincount(torch.tensor(ids)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def generative_perplexity(model, tokenizer, texts: list[str], seq_len: int, device: str | torch.device = "cpu",
                          rows_per_forward: int = 16) -> tuple[float, float, int]:
    """(perplexity, total NLL, scored tokens) of ``texts`` under an AR model, in windows of ``seq_len`` tokens
    overlapping by one (every token after the leading EOS is scored exactly once)."""
    from workbench.evaluation.scoring import Rows, score_ar

    windows: list[list[int]] = []
    for ids in tokenizer.encode_batch(texts):
        ids = [tokenizer.eos_id, *ids]
        for start in range(0, max(len(ids) - 1, 1), seq_len - 1):
            piece = ids[start:start + seq_len]
            if len(piece) > 1:
                windows.append(piece)
    if not windows:
        return math.nan, 0.0, 0
    rows = Rows.from_lists(windows, [1] * len(windows), pad_id=tokenizer.eos_id, device=device)
    scores = score_ar(model.net, rows, vocab_size=model.vocab_size, rows_per_forward=rows_per_forward)
    nll = float(-scores.logprob.sum())
    count = int((rows.length - 1).sum())
    return math.exp(min(nll / count, 700.0)), nll, count


# --------------------------------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from workbench.config import ConfigError
    from workbench.evaluation.checkpoint import load_run
    from workbench.evaluation.cli import DOWNSTREAM_FILE, pick_device, tidy_file, tidy_row

    checks = {"--num-samples": args.num_samples >= 1, "--batch-size": args.batch_size >= 1,
              "--steps": args.steps is None or args.steps >= 1, "--temperature": args.temperature > 0,
              "--top-k": args.top_k >= 0, "--top-p": 0 < args.top_p <= 1}
    for flag, ok in checks.items():
        if not ok:
            raise ConfigError("command line", flag, "out of range (counts >= 1, temperature > 0, top-k >= 0, "
                              "0 < top-p <= 1)")
    device = pick_device(args.device)
    loaded = load_run(args.checkpoint, device)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    objective = config.objective.name
    mode = args.mode if args.mode != "auto" else ("mdm" if objective == "mdm" else "ar")
    if mode == "ar" and objective == "mdm":
        raise ConfigError("command line", "--mode", "this is a masked-diffusion model (objective mdm): use --mode mdm")
    if mode == "mdm" and objective not in ("mdm", "dual"):
        raise ConfigError("command line", "--mode", f"--mode mdm needs a masked-diffusion model; objective is "
                          f"{objective!r}")
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
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples: list[list[int]] = []
    forwards = []
    start = time.time()
    for first in range(0, args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - first)
        prefix = torch.tensor([prompt] * n, device=device)
        options = {"vocab_size": model.vocab_size, "mask_id": model.mask_id, "temperature": args.temperature,
                   "top_k": args.top_k, "top_p": args.top_p, "generator": generator}
        if mode == "ar":
            tokens = sample_ar(model.net, prefix, length, **options)
            forwards += [length - len(prompt)] * n
        else:
            out = sample_mdm(model.net, prefix, length, steps, shifted=bool(model.shifted), cached=args.cached,
                             **options)
            tokens = out.tokens
            forwards += out.row_forwards.tolist()
        samples += tokens[:, 1:].tolist()
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
