"""``workbench prep``: corpus -> MDS shards (train with an exact unique-token budget, shared validation set)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a run YAML whose data section to prepare (optional)")
    parser.add_argument("--corpus", help="folder with split sub-folders, a file, or a hub dataset name "
                        "(default ${data}/wikipedia-en)")
    parser.add_argument("--train-split", help="split folder/file name for training (default train)")
    parser.add_argument("--val-split", help="split folder/file name for validation (default validation)")
    parser.add_argument("--text-column", help="column holding the document text (default text)")
    parser.add_argument("--tokenizer", choices=["gpt2", "bpe", "bert"], help="tokenizer kind (default gpt2)")
    parser.add_argument("--tokenizer-path", help="tokenizer files (gpt2: folder with encoder.json and vocab.bpe)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size of a trained bpe tokenizer")
    parser.add_argument("--seq-len", type=int, help="tokens per packed sequence (default 128)")
    parser.add_argument("--unique-tokens", help="exact training-token budget, e.g. 5M")
    parser.add_argument("--val-tokens", help="validation tokens, e.g. 256k")
    parser.add_argument("--subset-seed", type=int, help="seed of the document order the budget is taken from")
    parser.add_argument("--out", help="output folder (train/ and val/ inside); default: the content-addressed cache")
    parser.add_argument("--force", action="store_true", help="overwrite an output folder prepared differently")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. data.seq_len=256 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from datasets_prep.corpus import prepare
    from workbench.config import config_from_dict, deep_merge, load_run_config, parse_overrides

    flags = {"corpus": args.corpus, "train_split": args.train_split, "val_split": args.val_split,
             "text_column": args.text_column, "seq_len": args.seq_len, "unique_tokens": args.unique_tokens,
             "val_tokens": args.val_tokens, "subset_seed": args.subset_seed}
    data = {k: v for k, v in flags.items() if v is not None}
    tokenizer = {k: v for k, v in {"kind": args.tokenizer, "path": args.tokenizer_path,
                                   "vocab_size": args.vocab_size}.items() if v is not None}
    if tokenizer:
        data["tokenizer"] = tokenizer
    if args.tokenizer == "bert" and args.tokenizer_path is None:
        data["tokenizer"]["path"] = "${data}/tokenizers/bert-base-uncased"
    overrides = deep_merge({"data": data}, parse_overrides(args.override))
    if args.config:  # flags are taken as given (a --text-column yes or a --train-split 2020 stays a string)
        config = load_run_config(args.config, values=overrides)
    else:
        config = config_from_dict(overrides, "command line")
    prepared = prepare(config.data, out=args.out, force=args.force)
    for name, split in (("train", prepared.train), ("val", prepared.val)):
        manifest = split.manifest
        print(f"{name}: {split.path}\n  {manifest['num_tokens']:,} tokens in {manifest['num_sequences']:,} "
              f"sequences of {config.data.seq_len}; tokenizer {manifest['spec']['tokenizer']['kind']} "
              f"(vocab {manifest['spec']['tokenizer']['vocab_size']}, eos {manifest['spec']['tokenizer']['eos_id']}, "
              f"mask {manifest['spec']['tokenizer']['mask_id']})")
        if "unigram_entropy" in manifest:
            print(f"  unigram entropy (context-free baseline): {manifest['unigram_entropy']:.4f} nats/token")
    return 0

