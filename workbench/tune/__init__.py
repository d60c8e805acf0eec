"""Optuna studies (``workbench tune STUDY.yaml``) over regularization strengths (and any other run-config key).

A study YAML (``ablations/studies/*.yaml``) declares::

    name: token_masking_rate            # Optuna study name and results/<name>/
    run: {base: ../base/gpu_small.yaml, algorithms: {token_masking: {rate: 0.1}}}   # base run config
    search_space:                       # dotted run-config keys
      algorithms.token_masking.rate: {low: 0.0, high: 0.6}            # float (default type)
      optimizer.lr: {low: 1e-4, high: 1e-2, log: true}                # log-uniform float
      model.n_layers: {type: int, low: 2, high: 6, step: 2}
      algorithms.dropout: {choices: {off: null, on: {mlp: 0.1}}}     # on/off: labels -> values
      algorithms.dropout.mlp: {low: 0.05, high: 0.3}                  # only sampled when dropout is on
      objective.dual.mode: {choices: [steps, sequences]}
    objective: {metric: val/ar_nll, reduce: best, direction: minimize}   # or `objectives: [...]` (multi-objective)
    sampler: {name: tpe, seed: 0}       # tpe | random | cmaes | gp | grid | nsgaii; other keys go to the sampler
    pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 1ep}   # median | percentile |
                                        # successive_halving | hyperband | none; step options accept Nep / Ntok
    n_trials: 20                        # the study's total (``--trials`` overrides)
    budget: 32Mtok                      # per-trial token budget (trainer.max_duration of every trial)
    seeds: [0]                          # or a count; a trial's objective is the mean over its seeds
    enqueue: [{algorithms.token_masking.rate: 0.1}]   # known points (e.g. the paper's) run before sampling
    retry: {max_retry: 2, errors: false}
    heartbeat: {interval: 30, grace_period: 120}
    smoke: {...}                        # deep-merged over this file by --smoke (tiny CPU settings for tests)

Design decisions (why):

* **One training path.** Each trial is ``workbench.train.train(config, run_dir=results/<study>/trial-<n>/)`` with
  a pruning callback added; with several seeds the runs are ``trial-<n>/seed-<s>/``. Curves are the usual tidy
  ``metrics.parquet``; pruned and failed trials keep their partial curves (summary.json says pruned/failed).
* **Validation before any trial.** Every parameter is checked by building a run config with each of its
  representative values (both ends of a range, every choice; other parameters at their first value), so an
  unknown path, a value the schema rejects, an empty range, a log range touching 0, an objective metric the
  runs do not compute or a storage that cannot be reached all fail with a ConfigError naming the study file and
  key. ``name`` and ``seed`` are not searchable (they are per trial); ``trainer.max_duration`` comes from budget.
* **Conditional (on/off) parameters.** A categorical may choose whole sections (``{off: null, on: {...}}``;
  list choices that are not plain scalars get YAML labels). Parameters are applied parents first; a parameter
  below a path that this trial set to null is not sampled (define-by-run), so strengths of switched-off
  regularizers neither appear in the trial's params nor switch the section back on.
* **Pruning.** A Composer callback reads the objective from ``state.eval_metric_values`` at EVAL_END of the
  objective's evaluator (``val`` or a task name) and calls ``trial.report(value, step=tokens_seen)``; tokens
  (not evaluation indices) make steps comparable between trials at the same budget and survive resumption.
  When the pruner says so it raises ``optuna.TrialPruned`` at the next batch/epoch start, i.e. after the tidy
  logger flushed that evaluation (Composer runs loggers after callbacks within one event). The last evaluation
  never prunes (nothing left to save). Pruning needs a single objective; a multi-objective study must use
  ``pruner: none``. A NaN/inf objective value (divergence) that was not pruned fails the trial.
* **Exactly n_trials, any number of workers.** The process that creates the study (creation is atomic in the
  RDB: the others get DuplicatedStudyError) enqueues the known points and then plain WAITING "tickets" up to
  n_trials, and marks the study ready. Workers only ever claim WAITING trials (atomic RUNNING transition in
  Optuna's storage) and never create trials, so the study holds exactly n_trials originals plus retries.
  Raising ``--trials`` on an existing study tops it up; do that from one process (``--workers N`` tops up once
  in the parent before spawning), concurrent top-ups may over-create. Samplers are re-seeded per trial with
  ``seed + trial number``: reproducible whichever worker runs it, and concurrent workers never draw the same
  random point. A worker leaves when the study has no WAITING and no RUNNING trial; while other workers'
  trials run it polls, so it can pick up the retry of a trial whose worker died.
* **Crash safety.** Storage is Optuna's RDBStorage with heartbeats (``heartbeat.interval``) and a grace period;
  a RUNNING trial whose worker stopped beating is failed by the next worker that looks and re-enqueued by
  Optuna's RetryFailedTrialCallback (``RetryHeartbeatStaleTrialCallback`` in Optuna 5, with the intermediate
  values inherited), up to ``retry.max_retry`` times. The retry is a new trial number with the same params; it
  runs in its own folder and **resumes from the failed attempt's latest checkpoint** when that checkpoint is a
  complete file and the attempt's config matches (the checkpoint, config and rows up to it are copied, the run
  name rewritten); otherwise it starts clean. Its own folder means the killed process's leftovers (Streaming's
  per-run shard view, half-written files) are never reused; that folder's summary.json is marked failed. A
  trial that raises (NaN, OOM, any exception) is recorded as FAIL with ``user_attrs.error`` and the worker
  continues; it is retried only with ``retry.errors: true`` (a deterministic failure would just repeat). Ctrl-C
  fails the running trial, enqueues its retry and stops the worker.
* **Storage.** Default: an embedded SQLite file ``results/<study>/study.db`` (WAL journal, 60 s busy timeout;
  fine for a few local workers). ``--storage postgresql://user@host/db`` (any SQLAlchemy URL) shares one study
  between processes and machines: every worker runs the same command. ``optuna-dashboard <storage URL>`` shows
  the study (metric names are set). A study remembers the spec it was created from (run config, search space,
  objectives, budget, seeds); starting it again from a different spec is refused, like a run folder holding
  another config.
* **Data preparation** is guarded by a file lock under the prepared cache, so concurrent workers on one machine
  never prepare the same shards at once.

``workbench tune --summary STUDY.yaml`` prints trial counts, the best trials (the Pareto front for several
objectives) and parameter importances (fANOVA; PED-ANOVA when scikit-learn, which fANOVA needs, is missing),
and writes ``results/<study>/trials.csv`` plus seaborn figures in ``results/<study>/figures/``: the optimisation
history and the objective against each parameter.

Layout: ``spec`` (the study YAML and its validation), ``study`` (sampler, pruner, storage, creating the study),
``worker`` (claiming and running trials), ``summary`` (tables, importances, figures); the command line is
``workbench.commands.tune``.
"""

from workbench.tune.spec import Objective, Param, StudySpec, load_study_spec, parse_objective, parse_param, validate
from workbench.tune.study import connect, default_storage, make_pruner, make_sampler, open_study, storage_url
from workbench.tune.summary import summarize
from workbench.tune.worker import objective_values, run_trial, work

__all__ = ["Objective", "Param", "StudySpec", "connect", "default_storage", "load_study_spec", "make_pruner",
           "make_sampler", "objective_values", "open_study", "parse_objective", "parse_param", "run_trial",
           "storage_url", "summarize", "validate", "work"]
