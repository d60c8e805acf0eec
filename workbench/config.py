"""The one config loader: YAML run configs -> validated, typed dataclasses.

Every section is a dataclass; :func:`load_run_config` rejects unknown keys, wrong types and impossible
values with a :class:`ConfigError` that names the file, the dotted key and what is allowed, before any
data is prepared or any model is built. Command-line overrides use ``key.sub=value`` (the value is
parsed as YAML). ``${data}`` in a string expands to the data folder (see :mod:`workbench.paths`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from workbench import strict_yaml
from workbench.durations import parse_count, parse_duration

# --------------------------------------------------------------------------------------------------------------
# errors and small parsers


class ConfigError(ValueError):
    """A config problem, reported as ``<source>: <key>: <message>`` (``<source>: <message>`` for the whole file)."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


# --------------------------------------------------------------------------------------------------------------
# schema


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids. ``gpt2``/``bert`` load local files; ``bpe`` trains a small
    byte-level BPE on the training split (cached), so tiny models do not spend their parameters on a 50k
    embedding."""

    kind: Literal["gpt2", "bpe", "bert"] = "gpt2"
    path: str = "${data}/tokenizers/gpt2"
    vocab_size: int = 8192  # bpe only, including the special tokens
    train_documents: int = 2000  # bpe only: documents (from the seeded order of the train split) to train on

    def __post_init__(self) -> None:
        if self.kind == "bpe" and not 260 <= self.vocab_size <= 65535:
            raise ConfigError("", "vocab_size", f"must be in [260, 65535] for a byte-level BPE, got {self.vocab_size}")
        if self.train_documents < 1:
            raise ConfigError("", "train_documents", "must be >= 1")


@dataclass
class DataConfig:
    """The corpus, how it is tokenized and packed, and the exact unique-token budget."""

    corpus: str = "${data}/wikipedia-en"  # folder with split sub-folders, file(s), or a hub dataset name
    train_split: str = "train"
    val_split: str = "validation"
    text_column: str = "text"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 128
    unique_tokens: int = field(default=1_000_000, metadata={"parse": parse_count})
    val_tokens: int = field(default=262_144, metadata={"parse": parse_count})
    subset_seed: int = 0  # which documents form the unique-token budget (independent of the training seed)
    batch_size: int = 32  # global batch, in sequences
    num_workers: int = 0

    def __post_init__(self) -> None:
        if not 8 <= self.seq_len <= 65536:
            raise ConfigError("", "seq_len", f"must be in [8, 65536], got {self.seq_len}")
        if self.unique_tokens < self.seq_len:
            raise ConfigError("", "unique_tokens", f"must hold at least one sequence of seq_len={self.seq_len}")
        if self.val_tokens < self.seq_len:
            raise ConfigError("", "val_tokens", f"must hold at least one sequence of seq_len={self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError("", "batch_size", "must be >= 1")
        if self.num_workers < 0:
            raise ConfigError("", "num_workers", "must be >= 0")


@dataclass
class ModelConfig:
    """A GPT-style transformer; attention is causal or bidirectional per forward pass."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: float = 4.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attention: Literal["auto", "sdpa", "flash"] = "auto"  # auto: flash-attn on CUDA when installed, else SDPA
    compile: bool = False

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads"):
            if getattr(self, key) < 1:
                raise ConfigError("", key, "must be >= 1")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError("", "d_model", f"must split into n_heads={self.n_heads} heads of even size "
                              f"(RoPE rotates pairs), got d_model={self.d_model}")
        if self.mlp_ratio <= 0:
            raise ConfigError("", "mlp_ratio", "must be > 0")


@dataclass
class TimeSamplerConfig:
    """How diffusion time t (= masking rate) is drawn per sequence.

    uniform, antithetic (MDLM's low-discrepancy sampler: one offset for the batch, t_i = (u + i/B) mod 1),
    stratified (t_i = (i + u_i)/B), or bell-shaped around intermediate rates: beta(a, b),
    logit_normal(mu, sigma), truncated_normal(mu, sigma) on [0, 1]."""

    name: Literal["uniform", "antithetic", "stratified", "beta", "logit_normal", "truncated_normal"] = "uniform"
    a: float = 2.0
    b: float = 2.0
    mu: float = 0.0
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.a <= 0 or self.b <= 0:
            raise ConfigError("", "a" if self.a <= 0 else "b", "Beta parameters must be > 0")
        if self.sigma <= 0:
            raise ConfigError("", "sigma", "must be > 0")
        if self.name == "truncated_normal" and not 0 <= self.mu <= 1:
            raise ConfigError("", "mu", f"truncated_normal is centred inside [0, 1], got mu={self.mu}")


@dataclass
class DiffusionConfig:
    """The masked-diffusion (MDLM) objective's options."""

    time_sampler: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    eps: float = 1e-3  # smallest masking rate (MDLM samples t in [eps, 1])
    weighting: Literal["elbo", "sampled"] = "elbo"
    masking: Literal["bernoulli", "exact"] = "bernoulli"
    subs: bool = True
    shifted: bool | None = None  # None: True for the dual objective, False for plain MDM

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1:
            raise ConfigError("", "eps", f"must be in (0, 1), got {self.eps}")
        sampler = self.time_sampler
        if self.weighting == "elbo" and (sampler.name == "logit_normal" or (
                sampler.name == "beta" and max(sampler.a, sampler.b) >= 2)):
            # the importance weight 1/pi(t) is unbounded where pi vanishes: int 1/pi(t) dt diverges
            warnings.warn(f"time_sampler {sampler.name} with weighting 'elbo': the importance weights 1/pi(t) have "
                          "infinite variance (the loss stays unbiased but heavy-tailed); use weighting 'sampled', "
                          "or Beta a, b < 2, or truncated_normal", stacklevel=2)


@dataclass
class DualConfig:
    """AR + MDM mixing (Dual Language Models): a fraction ``ar_fraction`` of steps or sequences is AR."""

    ar_fraction: float = 0.5
    ar_fraction_end: float | None = None  # linear schedule from ar_fraction to this value over training
    mode: Literal["steps", "sequences"] = "steps"
    ar_weight: float = 1.0
    mdm_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("ar_fraction", "ar_fraction_end"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError("", key, f"is a fraction in [0, 1], got {value}")
        for key in ("ar_weight", "mdm_weight"):
            if getattr(self, key) < 0:
                raise ConfigError("", key, "must be >= 0")


@dataclass
class PrefixLMConfig:
    """Prefix-LM: bidirectional attention over a random-length prefix, causal (and scored) after it."""

    min_prefix: float = 0.0  # fractions of the sequence length
    max_prefix: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.min_prefix <= self.max_prefix < 1:
            raise ConfigError("", "max_prefix", "need 0 <= min_prefix <= max_prefix < 1, got "
                              f"{self.min_prefix}, {self.max_prefix}")


@dataclass
class ObjectiveConfig:
    """The single place the training loss is declared."""

    name: Literal["ar", "mdm", "dual", "prefix_lm"] = "ar"
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) (PaLM z-loss)
    diffusion: DiffusionConfig | None = None
    dual: DualConfig | None = None
    prefix_lm: PrefixLMConfig | None = None

    def __post_init__(self) -> None:
        uses = {"diffusion": ("mdm", "dual"), "dual": ("dual",), "prefix_lm": ("prefix_lm",)}
        for section, names in uses.items():
            if getattr(self, section) is not None and self.name not in names:
                raise ConfigError("", section, f"is only used with name: {' or '.join(names)} (name is {self.name!r})")
        if self.name in ("mdm", "dual") and self.diffusion is None:
            self.diffusion = DiffusionConfig()
        if self.name == "dual" and self.dual is None:
            self.dual = DualConfig()
        if self.name == "prefix_lm" and self.prefix_lm is None:
            self.prefix_lm = PrefixLMConfig()
        if self.diffusion is not None and self.diffusion.shifted is None:
            self.diffusion.shifted = self.name == "dual"
        if self.z_loss < 0:
            raise ConfigError("", "z_loss", "must be >= 0")


@dataclass
class OptimizerConfig:
    """The single place the optimizer is declared.

    ``adamw`` is torch's AdamW: the decay step is lr * weight_decay * p (coupled to the learning rate).
    ``decoupled_adamw`` is Composer's DecoupledAdamW: the decay step is weight_decay * (lr / initial lr) * p,
    i.e. NOT multiplied by the learning rate, so useful values are ~1000x smaller (e.g. 1e-5 vs 1e-2)."""

    name: Literal["adamw", "decoupled_adamw"] = "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to every parameter; use algorithms.weight_decay for exemptions/schedules

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("", "lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("", "betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError("", "weight_decay", "must be >= 0")


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: str = field(default="0.02dur", metadata={"parse": parse_duration})
    alpha_f: float = 0.1  # final lr as a fraction of the peak

    def __post_init__(self) -> None:
        if not 0 <= self.alpha_f <= 1:
            raise ConfigError("", "alpha_f", f"must be in [0, 1], got {self.alpha_f}")


@dataclass
class TokenMaskingConfig:
    """Input-token masking for AR training: inputs corrupted, targets stay the original next tokens."""

    rate: float | None = 0.1  # fixed rate p; or set max_rate / time_sampler for per-sequence rates
    max_rate: float | None = None  # per-sequence r ~ U(0, max_rate)
    time_sampler: TimeSamplerConfig | None = None  # per-sequence r from a diffusion time sampler
    replacement: Literal["mask", "zero", "random"] = "mask"
    mask_special: bool = False  # allow masking EOS tokens

    def __post_init__(self) -> None:
        chosen = [k for k in ("max_rate", "time_sampler") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ConfigError("", chosen[1], "choose one of rate, max_rate or time_sampler")
        if chosen:
            self.rate = None
        elif self.rate is None:
            raise ConfigError("", "rate", "set one of rate, max_rate or time_sampler")
        for key in ("rate", "max_rate"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError("", key, f"is a masking rate in [0, 1], got {value}")


@dataclass
class DropoutConfig:
    """Dropout probabilities. ``mlp_site``: ``hidden`` drops the MLP's activations (after the nonlinearity,
    before the down projection); ``output`` drops the MLP's output before the residual add."""

    mlp: float = 0.0
    mlp_site: Literal["hidden", "output"] = "hidden"
    attention: float = 0.0  # on the attention probabilities
    residual: float = 0.0  # on the attention block's output before the residual add
    embedding: float = 0.0

    def __post_init__(self) -> None:
        for key in ("mlp", "attention", "residual", "embedding"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError("", key, f"is a dropout probability in [0, 1), got {getattr(self, key)}")


@dataclass
class WeightDecayConfig:
    """Weight decay with parameter-group exemptions and an optional schedule; the optimizer's convention
    (coupled ``adamw`` or decoupled) decides how the value is applied."""

    value: float = 0.1
    exempt: list[Literal["norm", "bias", "embedding", "head"]] = field(default_factory=lambda: ["norm", "bias"])
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # multiplier from 1 to final_fraction
    final_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ConfigError("", "value", "must be >= 0")
        if not 0 <= self.final_fraction <= 1:
            raise ConfigError("", "final_fraction", "must be in [0, 1]")


@dataclass
class AlgorithmsConfig:
    """Regularizers; each is a Composer Algorithm, any combination, none by default."""

    token_masking: TokenMaskingConfig | None = None
    dropout: DropoutConfig | None = None
    weight_decay: WeightDecayConfig | None = None


@dataclass
class DownstreamConfig:
    """Zero-shot tasks evaluated during training (same fixed item sample in every run); see workbench.evaluation.

    ``scorers`` overrides ``scorer`` per task (e.g. ``{lambada_openai: chain}``). ``cfg_weight`` w > 0 turns on
    unsupervised classifier-free guidance for the diffusion scorers (logits u + (w+1)(c - u), Nie et al. 2024).
    ``masking``: how mc-elbo masks the continuation: ``exact`` (l ~ U{1..n} tokens, weight n/l, as SMDM/LLaDA) or
    ``bernoulli`` (rate t, weight 1/t). ``interval``: how often the tasks run (default: eval.interval)."""

    tasks: list[str] = field(default_factory=list)
    limit: int | None = 500  # items per task
    scorer: Literal["auto", "ar", "mc-elbo", "chain", "pll"] = "auto"  # auto: ar for AR models, mc-elbo for MDM
    scorers: dict[str, Literal["auto", "ar", "mc-elbo", "chain", "pll"]] = field(default_factory=dict)
    samples: int = 32  # Monte Carlo samples for mc-elbo
    batch_size: int = 64  # rows per forward pass
    seed: int = 1234  # item sample and estimator noise
    cfg_weight: float = 0.0
    masking: Literal["exact", "bernoulli"] = "exact"
    interval: str | None = field(default=None, metadata={
        "parse": lambda value: None if value is None else parse_duration(value)})

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError("", "limit", "must be >= 1 or null (all items)")
        if self.samples < 1:
            raise ConfigError("", "samples", "must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("", "batch_size", "must be >= 1")
        for task in self.scorers:
            if task not in self.tasks:
                raise ConfigError("", f"scorers.{task}", f"is not one of the evaluated tasks ({', '.join(self.tasks)})")
        if self.cfg_weight and "ar" in (self.scorer, *self.scorers.values()):
            raise ConfigError("", "cfg_weight", "classifier-free guidance applies to the diffusion scorers "
                              "(mc-elbo, chain, pll), not to the ar scorer")


@dataclass
class EvalConfig:
    interval: str = field(default="1ep", metadata={"parse": parse_duration})
    batch_size: int = 64
    nelbo_samples: int = 8  # K stratified diffusion times per validation sequence (fixed estimator)
    metrics: list[Literal["ar_nll", "mdm_nelbo"]] | None = None  # None: what the objective trains
    downstream: DownstreamConfig | None = None

    def __post_init__(self) -> None:
        if self.nelbo_samples < 1:
            raise ConfigError("", "nelbo_samples", "must be >= 1")
        if self.metrics is not None and not self.metrics:
            raise ConfigError("", "metrics", "must name at least one metric or be null")


@dataclass
class TrainerConfig:
    max_duration: str = field(default="2ep", metadata={"parse": parse_duration})
    device: Literal["auto", "cpu", "cuda", "gpu"] = "auto"  # gpu: the same as cuda (workbench.devices)
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"  # auto: amp_bf16 on GPU, fp32 on CPU
    microbatch_size: int | None = None
    grad_clip_norm: float | None = 1.0
    log_interval: int = 10  # batches between train-loss rows in metrics.parquet
    checkpoint_interval: str = field(default="1ep", metadata={"parse": parse_duration})
    keep_checkpoints: int = 2
    progress_bar: bool = True  # on a terminal, a redrawn bar; false: the plain per-evaluation lines there too

    def __post_init__(self) -> None:
        if self.max_duration.endswith("dur"):
            raise ConfigError("", "max_duration", "must be in ep, ba, sp or tok, not a fraction of itself")
        if self.log_interval < 1:
            raise ConfigError("", "log_interval", "must be >= 1")
        if self.keep_checkpoints < 1:
            raise ConfigError("", "keep_checkpoints", "must be >= 1 (resume needs the latest checkpoint)")
        if self.microbatch_size is not None and self.microbatch_size < 1:
            raise ConfigError("", "microbatch_size", f"must be >= 1 (or null: the whole per-process batch at once), "
                              f"got {self.microbatch_size}")


@dataclass
class TensorBoardLoggerConfig:
    """Composer's TensorboardLogger; events go to ``<dir>/<run name>/``."""

    dir: str | None = None  # default: tensorboard/ in the run's group folder (the ablation's or study's folder)
    flush_interval: int = 100  # batches


@dataclass
class MLflowLoggerConfig:
    """Composer's MLFlowLogger (MLflow 2: Composer 0.32.1 needs mlflow<3)."""

    tracking_uri: str | None = None  # default: the local file store mlruns/ in the run's group folder
    experiment: str | None = None  # default: the ablation's or study's name, else "workbench"


@dataclass
class WandbLoggerConfig:
    """Composer's WandBLogger; offline by default (no account, no network; ``wandb sync`` uploads later)."""

    project: str = "workbench"
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    dir: str | None = None  # default: the run's group folder (W&B writes a wandb/ folder there)
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggersConfig:
    """Experiment trackers fed the same tidy rows as metrics.parquet (which is always written); all off by
    default. See workbench/trackers.py."""

    tensorboard: TensorBoardLoggerConfig | None = None
    mlflow: MLflowLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None


CALLBACKS = ("speed_monitor", "lr_monitor", "memory_monitor", "runtime_estimator")


@dataclass
class RunConfig:
    """One training run."""

    name: str = "run"
    seed: int = 17
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    algorithms: AlgorithmsConfig = field(default_factory=AlgorithmsConfig)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.name):
            raise ConfigError("", "name", f"use letters, digits, '-', '_', '.' (it names a folder), got {self.name!r}")
        for key in self.callbacks:
            if key not in CALLBACKS:
                raise ConfigError("", f"callbacks.{key}", f"unknown callback; allowed: {', '.join(CALLBACKS)}")
        masking = self.algorithms.token_masking
        if masking is not None and self.objective.name == "mdm":
            raise ConfigError("", "algorithms.token_masking", "corrupts AR inputs, but objective mdm already masks "
                              "its inputs; use it with objective ar, dual or prefix_lm")
        decay = self.algorithms.weight_decay
        if decay is not None and self.optimizer.weight_decay:
            raise ConfigError("", "algorithms.weight_decay", "weight decay is declared twice; set optimizer."
                              "weight_decay: 0 when the weight_decay algorithm configures it")
        check_processes(self, 1)

    # convenience -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def eval_metrics(self) -> list[str]:
        """Validation metrics: explicit, or what the objective trains (both for dual)."""
        if self.eval.metrics is not None:
            return list(self.eval.metrics)
        return {"ar": ["ar_nll"], "prefix_lm": ["ar_nll"], "mdm": ["mdm_nelbo"], "dual": ["ar_nll", "mdm_nelbo"]}[
            self.objective.name]

    @property
    def shifted(self) -> bool:
        """Whether position i predicts token i+1 (always for AR; for MDM per the diffusion config)."""
        diffusion = self.objective.diffusion
        return True if diffusion is None else bool(diffusion.shifted)


def check_processes(config: RunConfig, world_size: int, source: str = "") -> None:
    """Refuse batch sizes that do not split over ``world_size`` processes (the global batches are divided evenly
    over the ranks, each rank's batch into microbatches) before any data is prepared, not as a traceback per rank."""
    processes = f"{world_size} processes (WORLD_SIZE={world_size})" if world_size > 1 else ""
    for key, batch in (("data.batch_size", config.data.batch_size), ("eval.batch_size", config.eval.batch_size)):
        if batch % world_size:
            raise ConfigError(source, key, f"{batch} is not divisible by the {processes}; each process takes an "
                              f"equal share of the global batch: use a multiple of {world_size}")
    micro = config.trainer.microbatch_size
    per_process = config.data.batch_size // world_size
    if micro is not None and per_process % micro:
        divisors = ", ".join(str(d) for d in range(1, per_process + 1) if per_process % d == 0)
        where = (f"the per-process batch of {per_process} (data.batch_size {config.data.batch_size} / {world_size} "
                 "processes)"
                 if world_size > 1 else f"data.batch_size {per_process}")
        raise ConfigError(source, "trainer.microbatch_size", f"{micro} must divide {where}; allowed: {divisors} "
                          "or null")


# --------------------------------------------------------------------------------------------------------------
# generic dataclass construction with key paths in every error


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__} of {', '.join(_type_name(a) for a in typing.get_args(tp))}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(source, key, f"must not be null; expected {_type_name(tp)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key, source)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(source, key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(source, key, f"{value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {k: _convert(v if v is not None else {}, value_tp, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, {} if value is None else value, source, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                raise ConfigError(source, key, f"expected a number, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf / .nan would train to nan losses or crash after data preparation
            raise ConfigError(source, key, f"expected a finite number (not .inf or .nan), got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def check_keys(values: dict[str, Any], allowed: tuple[str, ...], source: str, prefix: str = "",
               hint: str = "") -> None:
    """Reject the first key of ``values`` not in ``allowed``: ``<source>: <prefix>.<key>: unknown key; allowed: ...``
    (for the ablation and study files, whose sections are plain mappings rather than dataclasses)."""
    for name in values:
        if name not in allowed:
            raise ConfigError(source, f"{prefix}.{name}" if prefix else str(name),
                              f"unknown key; allowed: {', '.join(allowed)}{hint}")


def build_dataclass(cls: type, values: dict[str, Any], source: str = "<config>", prefix: str = "") -> Any:
    """Build ``cls`` from a mapping, naming ``source`` and the dotted key in every error."""
    if not isinstance(values, dict):
        raise ConfigError(source, prefix, f"expected a mapping of {cls.__name__} keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(source, key, f"unknown key; allowed in {prefix or 'the top level'}: "
                              f"{', '.join(sorted(fields))}")
        parse = fields[name].metadata.get("parse")
        if parse is not None:
            try:
                kwargs[name] = parse(value)
            except ValueError as err:
                raise ConfigError(source, key, str(err)) from None
        else:
            kwargs[name] = _convert(value, hints[name], key, source)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by __post_init__ with a key relative to this section
        inner = err.key
        raise ConfigError(source, f"{prefix}.{inner}" if prefix and inner else (inner or prefix), err.message) from None


# --------------------------------------------------------------------------------------------------------------
# YAML loading, overrides, dumping


def parse_overrides(overrides: list[str] | None, source: str = "command line") -> dict[str, Any]:
    """``["optimizer.lr=1e-3", "algorithms.dropout.mlp=0.1"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(source, item, "overrides are written key.sub=value")
        key, raw = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key.strip()):
            raise ConfigError(source, item, "overrides are written key.sub=value (a dotted key such as optimizer.lr)")
        try:
            value = strict_yaml.load(raw) if raw != "" else None
        except strict_yaml.DuplicateKeyError as err:
            raise ConfigError(source, f"{key.strip()}.{err.key}", "duplicate key; a key may appear once") from None
        except yaml.YAMLError as err:
            raise ConfigError(source, key, f"value is {strict_yaml.describe_error(err)}") from None
        set_dotted(nested, key.strip(), value)
    return nested


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def get_dotted(source: dict[str, Any], dotted: str) -> Any:
    node: Any = source
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; a null mapping value switches a section off."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The one reader of the workbench's YAML files (run, base, ablation and study files): UTF-8 text, a mapping,
    not empty, no key written twice; every problem is one ConfigError naming the file (and key and line)."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise ConfigError(source, "", "is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(source, "", "file not found")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(source, "", f"cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(source, "", f"not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save the file "
                          "as UTF-8") from None
    try:
        data = strict_yaml.load(text)
    except strict_yaml.DuplicateKeyError as err:
        raise ConfigError(source, err.key, f"duplicate key on line {err.line} (first on line {err.first_line}); a "
                          "key may appear once in a mapping") from None
    except yaml.YAMLError as err:
        raise ConfigError(source, "", strict_yaml.describe_error(err)) from None
    if data is None:
        raise ConfigError(source, "", "the file is empty (or holds only comments); write the settings to use")
    if not isinstance(data, dict):
        raise ConfigError(source, "", "a config file is a mapping of sections")
    return data


def resolve_base(data: dict[str, Any], path: str | Path, sources: dict[str, str] | None = None,
                 chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Follow ``base: other.yaml`` (relative to the including file) and merge this file on top.

    A cycle (a includes b includes a) is refused naming it. ``sources``, when given, receives the file that set
    each dotted key (the last one to write it), so errors can name the file that holds a wrong value."""
    path = Path(path)
    chain = (*chain, path)
    base = data.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(str(path), "base", f"expected the path of another run YAML (relative to this file), "
                              f"got {base!r}")
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if any(os.path.realpath(base_path) == os.path.realpath(p) for p in chain):
            cycle = " -> ".join(str(p) for p in (*chain, base_path))
            raise ConfigError(str(path), "base", f"files include each other in a cycle: {cycle}")
        if not base_path.exists():
            raise ConfigError(str(path), "base", f"{base!r} not found (looked for {base_path.absolute()})")
        merged = resolve_base(read_yaml(base_path), base_path, sources, chain)
    if sources is not None:
        _record_sources(data, str(path), sources)
    return deep_merge(merged, data) if merged else data


def _record_sources(values: dict[str, Any], source: str, sources: dict[str, str], prefix: str = "") -> None:
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        sources[dotted] = source
        if isinstance(value, dict):
            _record_sources(value, source, sources, dotted)
        else:  # replaces whatever a base file had below this key
            for stale in [k for k in sources if k.startswith(dotted + ".")]:
                del sources[stale]


def _source_of(key: str, sources: dict[str, str], default: str) -> str:
    """The file that set dotted ``key`` (or its nearest parent section); ``default`` when nobody did."""
    key = re.sub(r"\[\d+\]", "", key)
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return default


# top-level keys that mark the other YAML files (workbench ablate / workbench tune) when given to `workbench train`
_STUDY_KEYS = ("search_space", "run", "n_trials", "objectives", "sampler", "pruner", "enqueue")
_ABLATION_KEYS = ("variants", "grid", "zip", "repetition", "seeds", "smoke", "parallel")


def refuse_other_file_kinds(data: dict[str, Any], path: Path) -> None:
    """A run file is not an ablation or a study file: say which kind it is and which command takes it."""
    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    study = [k for k in _STUDY_KEYS if k in data and k not in run_keys]
    if study:
        raise ConfigError(str(path), study[0], f"this is a study file, not a run config: run it with `workbench "
                          f"tune {path}` (`workbench train` takes one run's YAML)")
    ablation = [k for k in _ABLATION_KEYS if k in data and k not in run_keys]
    if isinstance(data.get("base"), dict) or ablation:
        key = "base" if isinstance(data.get("base"), dict) else ablation[0]
        why = "its base: is a mapping" if key == "base" else f"it has {key}:"
        raise ConfigError(str(path), key, f"this is an ablation file ({why}), not a run config: run it with "
                          f"`workbench ablate {path}` (`workbench train` takes one run's YAML)")


def config_from_dict(values: dict[str, Any], source: str = "<config>") -> RunConfig:
    return build_dataclass(RunConfig, values, source)


def load_run_config(path: str | Path, overrides: list[str] | None = None, values: dict[str, Any] | None = None,
                    world_size: int = 1) -> RunConfig:
    """Read, merge (``base:``), override and validate a run config.

    ``values``: already parsed overrides (nested), applied after ``overrides``; both are reported as the command
    line. ``world_size``: the number of processes the run will be split over (see :func:`check_processes`).
    Errors name the file that holds the offending value: a base file, this file or the command line."""
    path = Path(path)
    data = read_yaml(path)
    refuse_other_file_kinds(data, path)
    sources: dict[str, str] = {}
    data = resolve_base(data, path, sources)
    command_line = deep_merge(parse_overrides(overrides), values or {})
    _record_sources(command_line, "command line", sources)
    data = deep_merge(data, command_line)
    try:
        config = config_from_dict(data, str(path))
        check_processes(config, world_size)
    except ConfigError as err:
        raise ConfigError(_source_of(err.key, sources, str(path)), err.key, err.message) from None
    return config


def dump_config(config: RunConfig) -> str:
    """The YAML a run folder stores (``config.yaml``), headed by its schema version (see :func:`config_differences`)."""
    header = f"# workbench run config, schema {CONFIG_SCHEMA_VERSION}\n"
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# run identity: is a stored config.yaml the same run as this config?

# Bump when an existing key changes meaning (adding a key with a default needs no bump: stored runs get the default).
# A stored config.yaml without the header line predates versioning and is schema 1.
CONFIG_SCHEMA_VERSION = 1
_SCHEMA_LINE = re.compile(r"#\s*workbench run config, schema (\d+)\s*$", re.MULTILINE)


def stored_schema_version(text: str) -> int:
    """The schema version in a stored config.yaml's header (1 when there is none: written before versioning)."""
    match = _SCHEMA_LINE.search(text)
    return int(match.group(1)) if match else 1


def _value_differences(stored: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in [*stored, *(k for k in current if k not in stored)]:
            out += _value_differences(stored.get(key), current.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if stored == current else [f"{prefix} (stored {stored!r}, now {current!r})"]


def config_differences(path: str | Path, config: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys (with both values) where the run config stored at ``path`` differs from ``config``.

    Compared by value, not by text: the stored YAML is re-validated by today's loader, so a key added to the
    schema since the run was written takes its default and does not make the run "changed". ``ignore`` lists
    top-level or dotted keys left out (e.g. ``name`` when a retried trial adopts another folder's run). Raises
    :class:`ConfigError` when the file is unreadable, invalid under today's schema, or of another schema version."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), "", f"cannot be read: {err}") from None
    version = stored_schema_version(text)
    if version != CONFIG_SCHEMA_VERSION:
        raise ConfigError(str(path), "", f"written with config schema {version}, this workbench reads schema "
                          f"{CONFIG_SCHEMA_VERSION}; keys may have changed meaning, so it cannot be compared")
    try:
        values = strict_yaml.load(text)
    except strict_yaml.DuplicateKeyError as err:
        raise ConfigError(str(path), err.key, f"duplicate key on line {err.line} (first on line {err.first_line})"
                          ) from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "", strict_yaml.describe_error(err)) from None
    stored = config_from_dict(values if values is not None else {}, str(path)).to_dict()
    return [d for d in _value_differences(stored, config.to_dict(), "")
            if not any(d == key or d.startswith((f"{key} ", f"{key}.")) for key in ignore)]
