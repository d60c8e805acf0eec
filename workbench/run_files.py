"""The names of the files in a run folder, defined once.

A plain module (no imports) so the command line (``--help`` texts), the ablation planner and the results
loader can name them without loading polars; :mod:`workbench.results` re-exports them beside its readers and
writers."""

from __future__ import annotations

METRICS_FILE = "metrics.parquet"  # tidy metric rows (workbench.results.SCHEMA)
SUMMARY_FILE = "summary.json"  # status, best values, device, error line
CONFIG_FILE = "config.yaml"  # the resolved run config (what workbench train reads on --resume)
CHECKPOINTS = "checkpoints"  # folder of Composer checkpoints
LATEST_CHECKPOINT = "latest-rank0.pt"  # in CHECKPOINTS: Composer's link to rank 0's newest checkpoint (its default)
TRAIN_LOG = "train.log"  # in CHECKPOINTS: output of a run the ablation runner started as a subprocess
VARIANT_FILE = "variant.json"  # the ablation runner's record of a run's ablation, variant, seed and repetition
DOWNSTREAM_FILE = "downstream.parquet"  # tidy rows of workbench eval / generate (same schema as METRICS_FILE)
