"""``workbench ablate ABLATION.yaml``: expand a declarative ablation into validated run configs and run them.

An ablation file::

    name: demo                        # default: the file name; runs go to results/<name>/<variant>/seed<k>/
    description: one line for the plan and the report
    parallel: 2                       # default for --parallel (the command line wins)
    base: ../configs/small.yaml       # a run YAML (relative to this file), or an inline run-config mapping
    seeds: [0, 1]                     # training seeds (config.seed); default: the base config's seed
    variants:                         # named variants: run-config overrides (nested or dotted keys)
      ar: {}
      mask:
        algorithms: [token_masking]   # an algorithm list switches algorithms on with their defaults
        grid:                         # a variant may sweep its own axes (crossed only with itself)
          algorithms.token_masking.rate: [0.1, 0.25]
      mdm: {objective.name: mdm}
    grid:                             # cartesian product, crossed with every variant
      alpha: {key: objective.dual.ar_fraction, values: [0, 0.5, 1]}
    zip:                              # axes of equal length, stepped together
      optimizer.lr: [1e-3, 3e-3]
      scheduler.warmup: [0.01dur, 0.05dur]
    repetition:                       # the data-repetition axis: unique tokens x epochs ...
      unique_tokens: [250k, 1M]
      epochs: [4, 16]
      # ... or a fixed budget split into N unique x E repetitions: {total_tokens: 8M, epochs: [1, 4, 16]}
    smoke:                            # --smoke: tiny scale for CPU
      overrides: {model: {n_layers: 2, d_model: 64, n_heads: 2}, trainer: {max_duration: 2ep}}
      seeds: [0]
      repetition: {unique_tokens: [32k], epochs: [2]}   # smoke may replace seeds, grid, zip and repetition
    scales:                           # --scale NAME: named scales, each a block like smoke: (--smoke = smoke:)
      cpu: {overrides: {model: {n_layers: 2, d_model: 64, n_heads: 2}}, seeds: [0, 1]}   # -> results/<name>-cpu/

A run's config is merged in this order: base, variant overrides, the variant's own grid/zip, the top-level
grid, zip and repetition, then (``--smoke`` / ``--scale NAME``) the scale's overrides, then ``name`` and
``seed``. Axes may not touch the same key as each other, and a scale's overrides may not touch a key any variant
or axis sets (they would silently erase the comparison). A scale other than smoke names the ablation
``<name>-<scale>`` (its folder and run names), so two scales of one study never share runs. The file itself
is validated by the run-config builder (typed sections in :mod:`workbench.ablate.schema`; every scale block,
whichever scale runs), and every run through :func:`workbench.config.config_from_dict`
before anything trains; errors name the file, the variant and the dotted key.

Variant names join the explicit name and one fragment per axis point with ``-``: numbers and booleans are
written ``<axis><value>`` (``rate0.1``), strings as the value (``zero``), mapping values need labels
(``values: {beta: {name: beta, a: 2}}``), and repetition points ``u<unique>-ep<epochs>`` (``u250k-ep16``).
The axis name of a dotted key is its last part. Run names are ``<ablation>-<variant>-seed<k>``.

Each run folder gets a ``variant.json`` (ablation, variant, group = the name without the repetition part,
repetition label, seed, declared order, the variant's overrides and the swept values) so
:mod:`workbench.analysis` joins configs without re-reading the ablation file.

Runs: completed runs are skipped, failed or interrupted ones resumed from their latest checkpoint, and a run
whose folder holds a different config is refused (for all runs, before anything trains). By default runs go
one after another in this process through :func:`workbench.train.train`; ``--parallel N``, ``--devices`` or
``--launcher composer`` run each as ``python -m workbench.cli train <run>/config.yaml --run-dir <run> --resume``
in a subprocess (the same code path), with output in ``<run>/checkpoints/train.log``. ``--devices 0,1`` pins one
run per GPU (``CUDA_VISIBLE_DEVICES``); ``--launcher composer --nproc N`` runs each run on N GPUs through
Composer's own launcher (``python -m composer.cli -n N -m workbench.cli train ...``: one process per GPU, Composer
wraps the model in DDP and each rank reads its share of the global batch), several such runs at once when
``--devices`` lists more than N GPUs. On CPU, ``--parallel N`` gives each subprocess cores/N threads
(``OMP_NUM_THREADS``): two one-thread runs beat one two-thread run for small models. Data is prepared once per
distinct data config before any run starts, so concurrent runs never prepare the same shards; Streaming's
shared-memory registration, which is not atomic across processes, happens under a machine-wide lock
(:func:`workbench.data.streaming_registration_lock`).

Every run is claimed before it trains (:mod:`workbench.claims`): any number of runner processes, on one machine or
several sharing the results folder, train each run once; a runner's subprocesses die with it and hold their runs'
claims themselves. ``--executor slurm`` submits the runs as a job array instead (:mod:`workbench.ablate.slurm`).

The plan's time estimate divides each run's training tokens by a tokens/s figure and adds its validation
passes (forward only, taken as 3x faster than a training step) and a fixed start-up cost; the tokens/s come
from the median ``tokens_per_s`` rows already in the results folder for runs of the same shape, else from a
short probe (a few AdamW steps of the model on random tokens on this machine). The plan says which.
"""

from workbench.ablate.plan import (
    STARTUP_S,
    assess,
    estimate,
    format_plan,
    measured_throughput,
    planned_epochs,
    planned_tokens,
    probe_throughput,
    shape_key,
)
from workbench.ablate.runner import (
    Outcome,
    Runner,
    Slot,
    best_table,
    die_with_parent,
    make_slots,
    prepare_data,
    subprocess_command,
    write_run_files,
    write_variant_file,
)
from workbench.ablate.spec import (
    VARIANT_FILE,
    Ablation,
    Axis,
    PlannedRun,
    Variant,
    format_count,
    load_ablation,
    parse_axes,
    parse_repetition,
    select_variants,
)
from workbench.progress import format_seconds

__all__ = [
    "STARTUP_S", "VARIANT_FILE", "Ablation", "Axis", "Outcome", "PlannedRun", "Runner", "Slot", "Variant", "assess",
    "best_table", "die_with_parent", "estimate", "format_count", "format_plan", "format_seconds", "load_ablation",
    "make_slots", "measured_throughput", "parse_axes", "parse_repetition", "planned_epochs", "planned_tokens",
    "prepare_data", "probe_throughput", "select_variants", "shape_key", "subprocess_command", "write_run_files",
    "write_variant_file",
]
