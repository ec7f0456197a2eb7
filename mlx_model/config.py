"""Model and training configuration: plain dataclasses, presets as named instances."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def _check_positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}"
            )


def _check_fraction(obj: Any, name: str, low_open: bool = False) -> None:
    value = getattr(obj, name)
    ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{type(obj).__name__}.{name} must be in {interval}, got {value!r}")


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

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


@dataclass(frozen=True)
class GPTConfig(_Serializable):
    """GPT-2-shaped model: learned positions, pre-LayerNorm blocks, GELU MLP."""

    vocab_size: int = 65
    block_size: int = 128  # context length in tokens
    n_layer: int = 3
    n_head: int = 4
    n_emb: int = 128
    dropout: float = 0.1
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    tie_weights: bool = True  # share the token embedding with the LM head, as GPT-2

    def __post_init__(self) -> None:
        _check_positive(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_emb"))
        if self.n_emb % self.n_head:
            raise ValueError(
                f"GPTConfig.n_emb ({self.n_emb}) must be divisible by n_head ({self.n_head})"
            )
        _check_fraction(self, "dropout")

    @property
    def head_dim(self) -> int:
        return self.n_emb // self.n_head


@dataclass(frozen=True)
class TrainConfig(_Serializable):
    """Optimisation and schedule; every field has a help text in TRAIN_HELP."""

    batch_size: int = 64
    max_iters: int = 2442
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int = 250
    log_interval: int = 50
    seed: int = 1337
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_positive(
            self,
            ("batch_size", "max_iters", "eval_interval", "eval_batches", "checkpoint_interval"),
        )
        _check_positive(self, ("log_interval",))
        if self.warmup_iters < 0:
            raise ValueError(f"TrainConfig.warmup_iters must be >= 0, got {self.warmup_iters!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(
                f"TrainConfig.min_lr must be in [0, learning_rate], got {self.min_lr!r}"
            )
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                "TrainConfig.compute_dtype must be float32, bfloat16 or float16, "
                f"got {self.compute_dtype!r}"
            )


TRAIN_HELP: dict[str, str] = {
    "batch_size": "sequences per optimisation step",
    "max_iters": "optimisation steps in the whole run",
    "learning_rate": "peak AdamW learning rate, reached after warm-up",
    "min_lr": "floor of the cosine decay",
    "warmup_iters": "steps of linear warm-up from 0 to learning_rate",
    "weight_decay": "AdamW decoupled weight decay, applied to matrices only",
    "beta1": "AdamW first-moment decay",
    "beta2": "AdamW second-moment decay",
    "grad_clip": "clip the global gradient norm to this (0 disables)",
    "eval_interval": "estimate train/val loss every this many steps",
    "eval_batches": "batches of fixed windows per loss estimate",
    "checkpoint_interval": "write the latest checkpoint every this many steps",
    "log_interval": "report progress every this many steps",
    "seed": "seeds initialisation, batch sampling and dropout",
    "compute_dtype": "dtype of the forward/backward pass; weights stay float32",
}


@dataclass(frozen=True)
class DataConfig(_Serializable):
    """How the corpus becomes token files."""

    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check_fraction(self, "val_fraction", low_open=True)


@dataclass(frozen=True)
class SampleConfig(_Serializable):
    """Generation parameters."""

    prompt: str = "\n"
    max_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: str | None = None

    def __post_init__(self) -> None:
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
# The same model on a sixth of the budget: the default, finishes in minutes on 2 CPU cores.
QUICK = Preset(
    "quick",
    SEED.model,
    SEED.train.replace(max_iters=400, warmup_iters=40, eval_interval=100, checkpoint_interval=100),
    "the seed model on 3.3M tokens: the default, under 15 minutes on 2 CPU cores",
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
        eval_batches=40,
        checkpoint_interval=500,
        # a GPU preset: bfloat16 compute (float32 weights) is 3x faster there, same quality
        compute_dtype="bfloat16",
    ),
    "nanoGPT's shakespeare-char configuration (6 layers, 6 heads, width 384, context 256)",
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

PRESETS: dict[str, Preset] = {p.name: p for p in (QUICK, SEED, NANOGPT_CHAR, TINY)}
DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    """Return the preset called `name`, or raise naming the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
