"""Progress of long stages: a terminal bar, log lines and a Prefect progress artifact."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .logs import stage_logger

ENV = "SHAKESPEARE_GPT_PROGRESS"  # "1" forces the terminal bars on, "0" off


def bars_enabled() -> bool:
    setting = os.environ.get(ENV)
    if setting is not None:
        return setting == "1"
    return sys.stderr.isatty()


@contextmanager
def terminal_bar(kind: str, description: str, total: float | None) -> Iterator[Any]:
    """A rich progress bar on stderr, or None when stderr is not a terminal."""
    if not bars_enabled():
        yield None
        return
    if kind == "download":
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        ]
    else:
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TaskProgressColumn(),
            TimeRemainingColumn(),
        ]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task_id = bar.add_task(description, total=total, loss="-", tps="-")
        yield lambda **kw: bar.update(task_id, **kw)


class RunProgressArtifact:
    """A Prefect progress artifact on the current task run, updated at most every 1%."""

    def __init__(self, key: str, description: str):
        self.id = None
        self.last = -1.0
        if TaskRunContext.get() is None:  # called outside a Prefect run (task.fn in tests)
            return
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)

    def update(self, percent: float) -> None:
        if self.id is None or percent - self.last < 1.0 and percent < 100.0:
            return
        self.last = percent
        update_progress_artifact(artifact_id=self.id, progress=percent)


@contextmanager
def training_reporter(max_iters: int, description: str) -> Iterator[Any]:
    """The train stage's callback: log lines, terminal bar and progress artifact in one."""
    artifact = RunProgressArtifact("training-progress", description)
    with terminal_bar("train", "training", max_iters) as bar:

        def report(p) -> None:  # p: mlx_model.train.Progress
            logger = stage_logger()
            if p.kind == "eval":
                logger.info(
                    "step %d/%d  train %.4f  val %.4f  lr %.2e  %.0f tok/s",
                    p.step,
                    p.max_iters,
                    p.train_loss,
                    p.val_loss,
                    p.lr,
                    p.tokens_per_sec,
                )
            elif p.kind == "log":
                remaining = (p.max_iters - p.step) * (p.elapsed / max(p.step, 1))
                logger.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  ~%.0f s left",
                    p.step,
                    p.max_iters,
                    p.train_loss,
                    p.lr,
                    p.tokens_per_sec,
                    remaining,
                )
            if bar is not None and p.train_loss is not None:
                bar(completed=p.step, loss=f"{p.train_loss:.4f}", tps=f"{p.tokens_per_sec:,.0f}")
            artifact.update(100.0 * p.step / p.max_iters)

        yield report
