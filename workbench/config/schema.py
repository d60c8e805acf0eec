"""The run-config schema: one dataclass per section of a run YAML, each checking its own values.

A ``__post_init__`` raises :class:`ConfigError` with a key relative to its section; :func:`build_dataclass`
prefixes the section's dotted path and the loader (:mod:`workbench.config.loader`) the file that set the value.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.config.build import ConfigError
from workbench.durations import parse_count, parse_duration


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

