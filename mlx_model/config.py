"""Model and training configuration: plain dataclasses, presets as named instances."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _check_positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}"
            )


def _check_finite(obj: Any) -> None:
    """Refuse a float field that is NaN or infinite: `inf > 0` passes every range check
    below, and a learning rate of inf turns every loss into NaN."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"{type(obj).__name__}.{f.name} must be a finite number, got {value!r}"
            )


def _check_range(obj: Any, name: str, low: float, high: float | None = None) -> None:
    """`low <= value` (and `value < high` when given)."""
    value = getattr(obj, name)
    if not (low <= value and (high is None or value < high)):
        interval = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{type(obj).__name__}.{name} must be {interval}, got {value!r}")


def _check_fraction(obj: Any, name: str, low_open: bool = False) -> None:
    value = getattr(obj, name)
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{type(obj).__name__}.{name} must be in {interval}, got {value!r}")


class Serializable:
    """to_dict, from_dict (refusing unknown fields), digest and replace for a config dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def key_dict(self) -> dict[str, Any]:
        """`to_dict` without the fields declared `changes_numbers=False` (see `option`):
        what a cache key or a resumed checkpoint must agree on."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        fixed = {f.name for f in fields if f.metadata.get("changes_numbers", True)}
        return {k: v for k, v in self.to_dict().items() if k in fixed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**data)

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def option(default: Any, help: str, changes_numbers: bool = True) -> Any:
    """A dataclass field with its help text (shown by the command line).

    `changes_numbers=False` declares that no weight, loss or sampled token depends on
    the field (how often progress is reported, say): it is left out of `key_dict`, so
    changing it reuses a cached stage and resumes an interrupted one."""
    return field(default=default, metadata={"help": help, "changes_numbers": changes_numbers})


def help_text(cls: type, name: str) -> str:
    """The help text of field `name` of dataclass `cls`."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


@dataclass(frozen=True)
class GPTConfig(Serializable):
    """GPT-2-shaped model: learned positions, pre-LayerNorm blocks, GELU MLP."""

    vocab_size: int = option(65, "token ids 0 .. vocab_size-1 (set from the vocabulary)")
    block_size: int = option(128, "context length in tokens")
    n_layer: int = option(3, "transformer blocks")
    n_head: int = option(4, "attention heads per block")
    n_emb: int = option(128, "embedding width")
    dropout: float = option(0.1, "dropout probability (embeddings, attention, residuals)")
    attention_dropout: bool = option(
        True,
        "dropout on the attention weights too (GPT-2, nanoGPT); off, attention runs as "
        "MLX's fused kernel and dropout stays on the embeddings and residual branches",
    )
    bias: bool = option(True, "biases in Linear layers and LayerNorms, as GPT-2")
    tie_weights: bool = option(True, "share the token embedding with the LM head, as GPT-2")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_positive(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_emb"))
        if self.n_emb % self.n_head:
            raise ValueError(
                f"GPTConfig.n_emb ({self.n_emb}) must be divisible by n_head ({self.n_head})"
            )
        _check_fraction(self, "dropout")

    @property
    def head_dim(self) -> int:
        return self.n_emb // self.n_head

    @property
    def attention_p(self) -> float:
        """The dropout probability on the attention weights in training: `dropout`, or 0
        with `attention_dropout` off."""
        return self.dropout if self.attention_dropout else 0.0


@dataclass(frozen=True)
class TrainConfig(Serializable):
    """Optimisation and schedule."""

    batch_size: int = option(64, "sequences per optimisation step")
    max_iters: int = option(2442, "optimisation steps in the whole run")
    learning_rate: float = option(1e-3, "peak AdamW learning rate, reached after warm-up")
    min_lr: float = option(1e-4, "floor of the cosine decay")
    warmup_iters: int = option(100, "steps of linear warm-up from 0 to learning_rate")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay, on matrices only")
    beta1: float = option(0.9, "AdamW first-moment decay")
    beta2: float = option(0.99, "AdamW second-moment decay")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")
    optimizer: str = option(
        "adamw",
        "adamw, or muon: Muon for the blocks' weight matrices, AdamW for embeddings and vectors",
    )
    muon_learning_rate: float = option(
        0.02, "peak Muon learning rate (optimizer muon); its floor scales as min_lr does"
    )
    eval_interval: int = option(250, "estimate train/val loss every this many steps")
    eval_batches: int = option(
        20,
        "batches of fixed windows per loss estimate (a split holding no more windows side "
        "by side is estimated from all of them)",
    )
    patience: int = option(
        0, "stop after this many evaluations in a row without a new best validation loss (0: never)"
    )
    # when latest/ is written: resuming continues exactly as an uninterrupted run (the
    # losses and the best weights are identical, tests/test_faults.py), so no number depends on it
    checkpoint_interval: int = option(
        250, "write the latest checkpoint every this many steps", changes_numbers=False
    )
    # when the host reads the mean training loss (and checks it is finite): a read, not a step
    log_interval: int = option(50, "report progress every this many steps", changes_numbers=False)
    seed: int = option(1337, "seeds initialisation, batch sampling and dropout")
    compute_dtype: str = option(
        "float32", "dtype of the forward/backward pass (float32, bfloat16, float16)"
    )
    grad_exchange: str = option(
        "compute",
        "dtype of the gradient all-reduce across processes: compute (the compute dtype, whose "
        "precision the gradients of its products already have) or float32",
    )

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_positive(
            self,
            ("batch_size", "max_iters", "eval_interval", "eval_batches", "checkpoint_interval"),
        )
        _check_positive(self, ("log_interval",))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"TrainConfig.patience must be an integer >= 0, got {self.patience!r}")
        if self.warmup_iters < 0:
            raise ValueError(f"TrainConfig.warmup_iters must be >= 0, got {self.warmup_iters!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(
                f"TrainConfig.min_lr must be in [0, learning_rate], got {self.min_lr!r}"
            )
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"TrainConfig.optimizer must be adamw or muon, got {self.optimizer!r}")
        _check_range(self, "weight_decay", 0.0)
        _check_range(self, "beta1", 0.0, 1.0)
        _check_range(self, "beta2", 0.0, 1.0)
        _check_range(self, "grad_clip", 0.0)
        if not self.muon_learning_rate > 0:
            raise ValueError(
                f"TrainConfig.muon_learning_rate must be > 0, got {self.muon_learning_rate!r}"
            )
        if self.grad_exchange not in ("compute", "float32"):
            raise ValueError(
                f"TrainConfig.grad_exchange must be compute or float32, got {self.grad_exchange!r}"
            )
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                "TrainConfig.compute_dtype must be float32, bfloat16 or float16, "
                f"got {self.compute_dtype!r}"
            )


BACKENDS = ("auto", "ring", "nccl", "mpi")


@dataclass(frozen=True)
class ParallelConfig(Serializable):
    """How many processes train together (data-parallel, through `mlx.launch`)."""

    processes: int = option(1, "training processes (1: this process alone)")
    backend: str = option(
        "auto", "mlx.launch backend: auto (nccl with CUDA, else ring), ring, nccl, mpi"
    )
    hostfile: str | None = option(None, "mlx.launch hostfile (JSON) for several machines")

    def __post_init__(self) -> None:
        _check_positive(self, ("processes",))
        if self.backend not in BACKENDS:
            raise ValueError(
                f"ParallelConfig.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.hostfile is not None:
            hosts = read_hostfile(self.hostfile)
            if self.processes not in (1, len(hosts)):
                raise ValueError(
                    f"hostfile {self.hostfile!r} lists {len(hosts)} processes, but "
                    f"processes is {self.processes}"
                )

    @functools.cached_property
    def world_size(self) -> int:
        return len(read_hostfile(self.hostfile)) if self.hostfile else self.processes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.hostfile is not None


def read_hostfile(path: str) -> list[dict[str, Any]]:
    """The hosts of an `mlx.launch` hostfile (one per process); raises naming what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"hostfile {path!r} cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"hostfile {path!r} is not JSON: {err}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        raise ValueError(f"hostfile {path!r} has no list of hosts")
    for i, host in enumerate(hosts):
        if not isinstance(host, dict) or not isinstance(host.get("ssh"), str):
            raise ValueError(f'hostfile {path!r}: host {i} needs an "ssh" name, got {host!r}')
    return hosts


@dataclass(frozen=True)
class DataConfig(Serializable):
    """How the corpus becomes token files."""

    val_fraction: float = option(0.1, "share of the corpus (its end) held out for validation")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_fraction(self, "val_fraction", low_open=True)


@dataclass(frozen=True)
class SampleConfig(Serializable):
    """Generation parameters."""

    prompt: str = option("\n", "text the sample continues")
    max_tokens: int = option(500, "characters to generate")
    temperature: float = option(0.8, "softmax temperature (0: greedy)")
    top_k: int | None = option(None, "sample among the k most likely tokens only")
    top_p: float | None = option(None, "sample from the smallest set with this probability mass")
    seed: int = option(0, "sampling seed: same seed, same text")
    stop: str | None = option(None, "end the sample before this string")

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_positive(self, ("max_tokens",))
        if not self.temperature >= 0:
            raise ValueError(f"SampleConfig.temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"SampleConfig.top_k must be positive, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"SampleConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not self.prompt:
            raise ValueError("SampleConfig.prompt must not be empty")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SampleConfig.seed must be a non-negative integer, got {self.seed!r}")
        if self.stop is not None and not self.stop:
            raise ValueError("SampleConfig.stop must not be empty (leave it unset for no stop)")


@dataclass(frozen=True)
class ServeConfig(Serializable):
    """The OpenAI-compatible server (`shakespeare-gpt api`): where it listens, its limits."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 exposes it to the network)")
    port: int = option(8000, "TCP port")
    max_queue: int = option(16, "requests that may wait while one generates; more get 503")
    max_tokens_limit: int = option(4096, "largest max_tokens a request may ask for")
    max_request_bytes: int = option(1_048_576, "largest request body, in bytes; more get 413")

    def __post_init__(self) -> None:
        _check_positive(self, ("port", "max_queue", "max_tokens_limit", "max_request_bytes"))
        if self.port > 65535:
            raise ValueError(f"ServeConfig.port must be at most 65535, got {self.port!r}")
        if not self.host:
            raise ValueError("ServeConfig.host must not be empty")

    def check(self, defaults: SampleConfig) -> None:
        """Raise ValueError if the default request (`defaults`) is already over the limit."""
        if defaults.max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"max_tokens {defaults.max_tokens} is over max_tokens_limit {self.max_tokens_limit}"
            )


@dataclass(frozen=True)
class Preset:
    """A named pair of model and training configurations."""

    name: str
    model: GPTConfig
    train: TrainConfig
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)


# The tutorial's model. 2442 steps x 64 x 128 = 20.0M training tokens, the tutorial's budget.
# Its recipe (dropout 0.1, AdamW 1e-3) reaches 1.651 on this budget with random windows; a
# small model wants a higher rate and less dropout: 3e-3 and 0.05 reach 1.504 (BENCHMARKS.md).
SEED = Preset(
    "seed",
    GPTConfig(block_size=128, n_layer=3, n_head=4, n_emb=128, dropout=0.05),
    TrainConfig(batch_size=64, max_iters=2442, learning_rate=3e-3, min_lr=3e-4, warmup_iters=100),
    "the tutorial's model (context 128, width 128, 4 heads, 3 layers) on 20M tokens",
)
# The same model on 800 steps (6.6M tokens), estimated 4 times: the default. On a 2-core
# CPU the whole job takes 5 to 6 minutes to about 1.72 (docs/BENCHMARKS.md); 400 steps
# ended at a validation loss of 2.02, letter soup, and 700 steps estimated 7 times at 1.78.
QUICK = Preset(
    "quick",
    SEED.model,
    SEED.train.replace(max_iters=800, warmup_iters=40, eval_interval=200, checkpoint_interval=200),
    "the seed model on 6.6M tokens: the default, 5 to 6 minutes on 2 CPU cores",
)
NANOGPT_CHAR = Preset(
    "nanogpt-char",
    GPTConfig(block_size=256, n_layer=6, n_head=6, n_emb=384, dropout=0.2),
    TrainConfig(
        batch_size=64,
        max_iters=5000,
        learning_rate=1e-3,
        min_lr=1e-4,
        warmup_iters=100,
        beta2=0.99,
        # weight decay 0.5 instead of nanoGPT's 0.1: best val 1.4595 instead of 1.4748; the
        # model overfits after ~1800 steps, so it is evaluated every 100 to catch the best.
        weight_decay=0.5,
        eval_interval=100,
        # 512 windows a split, a little more than Tiny Shakespeare's validation split holds
        # at context 256 (435, estimated whole; a split is taken whole up to 512 windows,
        # val_fraction up to about 0.117): the train split's estimate as precise as the
        # validation one, an estimate 4 forward passes on a GPU (256 windows a pass)
        # instead of 12 with 40 batches, the validation loss the same
        eval_batches=8,
        # validation stops improving near step 2000 and rises after: stop 5 estimates
        # (500 steps) after the best instead of running all 5000
        patience=5,
        checkpoint_interval=500,
        # a GPU preset: bfloat16 compute (float32 weights) is 3x faster there, same quality
        compute_dtype="bfloat16",
    ),
    "nanoGPT's shakespeare-char configuration (6 layers, 6 heads, width 384, context 256)",
)
# nanogpt-char with Muon on the blocks' matrices (BatchedMuon; AdamW on the rest), a
# 1000-step schedule and dropout 0.1: Muon alone reached 1.47 at step 1100-1200 (1600-1700
# for AdamW) and went on to 1.43; a short run overfits less, so it needs less dropout, and
# its cosine anneals sooner: in a sweep on one H100, 1.47 at step 700, best 1.447 at 800
# (bench/gpu_recipe_sweep.sh, bench/sweeps/muon-wave1.txt). Attention without dropout
# (MLX's fused kernel, 12-40% more tokens/s) stays an option (attention_dropout=false).
# Figures: docs/BENCHMARKS.md.
NANOGPT_CHAR_FAST = Preset(
    "nanogpt-char-fast",
    NANOGPT_CHAR.model.replace(dropout=0.1),
    NANOGPT_CHAR.train.replace(optimizer="muon", max_iters=1000),
    "nanogpt-char with Muon, 1000 steps and dropout 0.1: 1.47 in about 700 steps",
)
GPT2_CHAR = Preset(
    "gpt2-char",
    # GPT-2 small's blocks (12 layers, 12 heads, width 768; 85M parameters) at
    # nanogpt-char's context, batch and schedule: a model whose step is mostly arithmetic,
    # for scaling over several GPUs. Its schedule is nanogpt-char's, not tuned for it.
    GPTConfig(block_size=256, n_layer=12, n_head=12, n_emb=768, dropout=0.2),
    NANOGPT_CHAR.train,
    "GPT-2 small's blocks at nanogpt-char's context: for multi-GPU scaling; untuned",
)

TINY = Preset(
    "tiny",
    GPTConfig(block_size=16, n_layer=2, n_head=2, n_emb=16, dropout=0.0),
    TrainConfig(
        batch_size=8,
        max_iters=30,
        learning_rate=3e-3,
        min_lr=3e-4,
        warmup_iters=5,
        eval_interval=10,
        eval_batches=2,
        checkpoint_interval=10,
        log_interval=5,
    ),
    "a toy model for tests: seconds on any machine",
)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (QUICK, SEED, NANOGPT_CHAR, NANOGPT_CHAR_FAST, GPT2_CHAR, TINY)
}
DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    """Return the preset called `name`, or raise naming the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
