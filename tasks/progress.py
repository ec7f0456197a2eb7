"""Progress of long stages: terminal bars, log lines and a Prefect progress artifact.

On a terminal one `rich` Console owns stderr: the running stages' bars share one live
area at the bottom, and every log line (`LogHandler`, which the command line puts in
place of Prefect's console handler) is printed whole above it, wrapped at word
boundaries. A finished stage's bar becomes one summary line. Not a terminal (a pipe, CI,
a Dask worker): no bars, no escape codes, the log lines as Prefect formats them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.logging.handlers import PrefectConsoleHandler
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from .logs import stage_logger

ENV = "SHAKESPEARE_GPT_PROGRESS"  # "1" forces the terminal bars on, "0" off

_console: Console | None = None
_bars: Progress | None = None


def bars_enabled() -> bool:
    setting = os.environ.get(ENV)
    if setting is not None:
        return setting == "1"
    return sys.stderr.isatty()


def console() -> Console:
    """The one Console that writes to stderr in this process (bars and log lines)."""
    global _console
    if _console is None:
        _console = Console(stderr=True, highlight=False)
    return _console


def _live_bars() -> Progress:
    """The shared live area, started on first use; one task per running stage."""
    global _bars
    if _bars is None:
        width = console().width
        _bars = Progress(
            TextColumn("{task.description:<8}"),
            BarColumn(bar_width=max(10, min(40, width - 66))),
            TextColumn("{task.fields[figures]}"),
            TimeRemainingColumn(),
            console=console(),
            transient=True,  # the bars go when the last stage ends; summaries stay
            # a sample streamed to the same terminal prints above the bars, line by line
            # (stdout sent to a file is left alone)
            redirect_stdout=sys.stdout.isatty(),
        )
    if not _bars.live.is_started:
        _bars.start()
    return _bars


@contextmanager
def terminal_bar(
    kind: str, description: str, total: float | None
) -> Iterator[Callable[..., None] | None]:
    """A bar in the live area while the block runs, then one summary line; None when
    stderr is not a terminal. The callback takes `completed`, `total` and `figures` (the
    text shown beside the bar, and in the summary)."""
    if not bars_enabled():
        yield None
        return
    bars = _live_bars()
    started = time.monotonic()
    task_id = bars.add_task(description, total=total, figures="")
    ok = False
    try:
        yield lambda **kw: bars.update(task_id, **kw)
        ok = True
    finally:
        figures = bars.tasks[bars.task_ids.index(task_id)].fields["figures"]
        bars.remove_task(task_id)
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        elapsed = time.monotonic() - started
        console().print(f"{mark} {description:<8} {figures}  [dim]{elapsed:.1f} s[/]")
        if not bars.tasks:
            bars.stop()


class LogHandler(PrefectConsoleHandler):
    """Prefect's console handler, printing through the one Console: above the live bars,
    never inside a bar's line, long lines wrapped between words. Its lines are short:
    time, the task run (or flow run), the level when it is not INFO, the message."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
            line = Text.assemble(
                (time.strftime("%H:%M:%S ", time.localtime(record.created)), "dim"),
                (f"{run or record.name} ", "cyan"),
                (f"{record.levelname} " if record.levelno != logging.INFO else "", "yellow"),
                record.getMessage(),
            )
            if record.exc_info:
                line.append("\n" + logging.Formatter().formatException(record.exc_info))
            console().print(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


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


def _train_figures(p, val: float | None) -> str:  # p: mlx_model.train.Progress
    figures = f"step {p.step}/{p.max_iters}  loss {p.train_loss:.4f}"
    if val is not None:
        figures += f"  val {val:.4f}"
    return figures + f"  {p.tokens_per_sec:,.0f} tok/s"


@contextmanager
def training_reporter(max_iters: int, description: str) -> Iterator[Any]:
    """The train stage's callback: log lines, terminal bar and progress artifact in one."""
    artifact = RunProgressArtifact("training-progress", description)
    val: float | None = None
    with terminal_bar("train", "train", max_iters) as bar:

        def report(p) -> None:  # p: mlx_model.train.Progress
            nonlocal val
            logger = stage_logger()
            if p.kind == "eval":
                val = p.val_loss
                logger.info(
                    "step %d/%d  train %.4f  val %.4f  lr %.2e  %.0f tok/s",
                    p.step,
                    p.max_iters,
                    p.train_loss,
                    p.val_loss,
                    p.lr,
                    p.tokens_per_sec,
                )
            elif p.kind == "resume":
                # the "training on" line names this process's attention; a resumed run
                # keeps the one its checkpoint began with
                kept = f"; attention {p.attention}, as it began" if p.attention else ""
                logger.info("resuming from step %d (the latest checkpoint)%s", p.step, kept)
            elif p.kind == "log":  # elapsed counts from the step this process started at
                remaining = (p.max_iters - p.step) * (p.elapsed / max(p.step - p.start, 1))
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
                bar(completed=p.step, figures=_train_figures(p, val))
            artifact.update(100.0 * p.step / p.max_iters)

        yield report
