"""Train the GPT on the token files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model import checkpoint, ops, warmup
from mlx_model.config import GPTConfig, ParallelConfig, TrainConfig
from mlx_model.data import Vocab, read_tokens
from mlx_model.distributed import backend, rank_lanes, train_distributed
from mlx_model.files import write_text_atomic
from mlx_model.ops import cuda
from mlx_model.runtime import kernel_cache
from mlx_model.train import BEST, LATEST, TrainingDiverged, TrainingInterrupted, train

from .logs import stage_logger
from .prepare import TRAIN, VAL, VOCAB
from .progress import training_reporter
from .store import ArtifactStore, StageOutput, code_version, finished

__all__ = [
    "METRICS",
    "WEIGHTS",
    "TrainingDiverged",
    "TrainingInterrupted",
    "best_model",
    "prepare_device",
    "train_model",
]

METRICS = "metrics.json"
WEIGHTS = f"{BEST}/{checkpoint.WEIGHTS}"  # the best model, which later stages load


def prepare_device(
    model: GPTConfig | None = None,
    training: TrainConfig | None = None,
    parallel: ParallelConfig | None = None,
) -> bool:
    """Load the attention this process's training runs on a GPU (`ops.cuda.for_run`:
    cuDNN's extension and its check, 0.4 s on an H200; on a fresh machine, its build is
    started), so that a command can do it while it waits for something else: the CLI does
    it while Prefect's temporary server boots. Given the run's model and training settings
    and one process to train in (no mlx.launch ranks), it also runs that training's
    compiled step once if the kernel cache holds its kernels
    (`mlx_model.warmup.warm_process`); returns whether it did. Nothing happens on a CPU.
    Raises ValueError for a bad SHAKESPEARE_GPT_ATTENTION."""
    cuda.for_run()
    if model is None or training is None or (parallel is not None and parallel.distributed):
        return False
    return warmup.warm_process(model, training)


def best_model(trained: StageOutput) -> Path:
    """The folder of the best model a train stage wrote (for `load_model`)."""
    return Path(trained.path) / BEST


def train_key(
    tokens: StageOutput,
    vocab: StageOutput,
    cfg: GPTConfig,
    training: TrainConfig,
    parallel: ParallelConfig,
    signature: dict,
) -> dict:
    """What the train stage's cache key covers: its inputs' digests, the model and the
    training settings that change a number (`TrainConfig.key_dict`), its code, the ops
    backend (`signature`) and, over several processes, their layout."""
    key = {
        "train": tokens.digest(TRAIN),
        "val": tokens.digest(VAL),
        "vocab": vocab.digest(VOCAB),
        "model": cfg.to_dict(),
        "training": training.key_dict(),
        "code": code_version(__name__),
        # which attention ran is recorded, not keyed: cuDNN's becomes available after a
        # first run builds it, and a rerun with nothing changed must still find that run
        # (a resumed run keeps the attention it began with: mlx_model.train)
        "ops": {k: v for k, v in signature.items() if k != "attention"},
    }
    if parallel.distributed:  # the reduction order over the group changes the numbers
        key["parallel"] = {"world_size": parallel.world_size, "backend": backend(parallel)}
    return key


@task(name="train", cache_policy=NO_CACHE)
def train_model(
    store: ArtifactStore,
    tokens: StageOutput,
    vocab: StageOutput,
    model: GPTConfig,
    training: TrainConfig,
    parallel: ParallelConfig | None = None,
    force: bool = False,
) -> StageOutput:
    """Train the GPT; resumes from the stage's latest checkpoint if one exists."""
    parallel = parallel or ParallelConfig()
    v = Vocab.load(vocab.file(VOCAB))
    cfg = model.replace(vocab_size=v.size)
    if ops.native_build_pending(training.compute_dtype):
        stage_logger().info(
            "building the native CPU kernels with the C++ compiler (once for this MLX "
            "install; 10 to 30 s on 2 cores)"
        )
    if ops.cuda_build_pending(training.compute_dtype, cfg):
        stage_logger().info(
            "building cuDNN attention with the C++ compiler (once for this MLX install; about 25 s)"
        )
    with ops.use(lanes=rank_lanes(parallel)):
        signature = ops.signature(training.compute_dtype, model=cfg)
    if cuda.building():
        stage_logger().info(
            "building cuDNN attention in the background for the next runs (once for this "
            "MLX install; about 25 s); this run computes attention with MLX's operations"
        )
    key = train_key(tokens, vocab, cfg, training, parallel, signature)
    runtime = {**signature, "dtype": training.compute_dtype}
    runtime["processes"] = parallel.world_size
    if kernels := kernel_cache.active():
        runtime["kernel cache"] = kernels.describe()

    def compute(directory: Path) -> dict:
        if force:
            for folder in (LATEST, f"{LATEST}.new", f"{LATEST}.old"):  # and a cut-short swap
                shutil.rmtree(directory / folder, ignore_errors=True)
        if ops.half_on_cpu(training.compute_dtype):
            stage_logger().warning(
                "compute_dtype %s on the CPU: measured 13x to 62x slower than float32 (is "
                "this a GPU preset?); on a CPU, pass --set training.compute_dtype=float32, or "
                "use the quick or seed preset",
                training.compute_dtype,
            )
        stage_logger().info("training on %s", ", ".join(f"{k} {v}" for k, v in runtime.items()))
        train_path, val_path = tokens.file(TRAIN), tokens.file(VAL)
        with training_reporter(training.max_iters, f"training {directory.name}") as report:
            if parallel.distributed:
                result = train_distributed(
                    cfg, training, parallel, train_path, val_path, directory, report
                )
            else:
                train_ids, val_ids = read_tokens(train_path)[0], read_tokens(val_path)[0]
                result = train(cfg, training, train_ids, val_ids, directory, callback=report)
        shutil.copyfile(vocab.file(VOCAB), directory / VOCAB)
        # the attention that ran: a resumed run keeps the one its checkpoint began with
        ran = {"attention": result.attention} if result.attention else {}
        metrics = {**dataclasses.asdict(result), "runtime": {**runtime, **ran}}
        write_text_atomic(directory / METRICS, json.dumps(metrics, indent=2))
        return {k: v for k, v in metrics.items() if k not in ("history", "train_log")}

    config = f"{BEST}/{checkpoint.CONFIG}"
    return finished(store.run("train", key, compute, [WEIGHTS, config, VOCAB, METRICS], force))
