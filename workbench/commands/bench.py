"""``workbench bench``: throughput of a plain PyTorch loop vs. the workbench trainer (see workbench.bench)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workbench.bench import SHAPES
from workbench.devices import DEVICE_CHOICES, DEVICE_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default=None, choices=list(SHAPES),
                        help="model/batch shape (default: tiny on CPU, gpt2-1024 on CUDA)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CPU, 10 CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both paths")
    parser.add_argument("--algorithms", action="store_true", help="also measure each algorithm's step overhead")
    parser.add_argument("--eval", action="store_true", help="also measure downstream-evaluation items/s")
    parser.add_argument("--host-repeats", type=int, default=5,
                        help="runs of each framework host-time measurement, the best reported (default 5; 0 skips it)")
    parser.add_argument("--out", help="write the result as JSON here (e.g. results/bench/h100.json)")


def run(args: argparse.Namespace) -> int:
    from workbench.bench import format_table, run_benchmark
    from workbench.devices import resolve_device

    device = resolve_device(args.device)
    gpu = device == "cuda"
    result = run_benchmark(args.shape or ("gpt2-1024" if gpu else "tiny"), device,
                           args.steps or (50 if gpu else 10), args.warmup if args.warmup is not None else
                           (10 if gpu else 3), args.compile, args.algorithms, args.eval, args.host_repeats)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
