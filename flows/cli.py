"""`shakespeare-gpt`: run the pipeline, one stage of it, sample, serve on a schedule, export.

Exit codes: 0 done, 2 bad input (one line, `error: ...`), 3 the Prefect API stopped
answering, 130 (143) stopped by Ctrl-C (SIGTERM) with a resumable checkpoint, 1 a run that
failed: one line for a loss that diverged or an operating-system refusal (a full disk),
a traceback for anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Only light modules here: `--help` and a bad flag answer before Prefect, NumPy and the
# pipeline are imported (each command imports them in `execute`)
from tasks.config import (
    DEFAULT_PRESET,
    PRESETS,
    SECTIONS,
    RunConfig,
    ServeConfig,
    help_text,
    parse_value,
)
from tasks.preflight import check_export_target, check_run
from tasks.store import default_root

from .command_env import DASK_LOGGING, DASK_QUIETED
from .entry import RESUME, terminate
from .stages import STAGES, check_stage, fresh_stages

DEPLOYMENT = "scheduled"
DEBUG_ENV = "SHAKESPEARE_GPT_DEBUG"
# Flags that override one configuration field each; `--set SECTION.FIELD=VALUE` reaches any.
FLAGS = (
    *(("source", f) for f in ("source", "sha256", "max_bytes")),
    ("training", "max_iters"),
    ("data", "val_fraction"),
    *(("sampling", f) for f in ("prompt", "max_tokens", "temperature", "top_k", "top_p")),
    *(("sampling", f) for f in ("seed", "stop")),
    *(("parallel", f) for f in ("processes", "backend", "hostfile")),
)
PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / d) for d in ("flows", "tasks"))


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (`error: ...`, exit 2), without the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _field_type(section: str, name: str):
    def parse(text: str) -> Any:
        try:
            return parse_value(section, name, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name  # argparse names it in "invalid <name> value"
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return value


def _common(p: argparse.ArgumentParser, sampling: bool = True) -> None:
    p.add_argument(
        "--preset",
        default=None,
        help=f"one of {', '.join(sorted(PRESETS))} (default {DEFAULT_PRESET})",
    )
    p.add_argument(
        "--artifacts",
        default=None,
        help="artifact root (default: $SHAKESPEARE_GPT_ARTIFACTS or ./artifacts)",
    )
    for section, name in FLAGS:
        if section == "sampling" and not sampling:
            continue
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"{section}.{name}",
            metavar=name.upper(),
            type=_field_type(section, name),
            default=None,
            help=f"{help_text(SECTIONS[section], name)} ({section}.{name})",
        )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=f"override any configuration field; sections: {', '.join(SECTIONS)}",
    )
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="recompute this stage even if cached (repeatable; 'all' for every stage)",
    )
    p.add_argument(
        "--from",
        dest="from_stage",
        default=None,
        metavar="STAGE",
        help="recompute STAGE and every stage after it, reusing the cached upstream",
    )
    if sampling:
        p.add_argument(
            "--model",
            default=None,
            metavar="best-of:SWEEP",
            help="use a sweep's best trial instead of training (sample, evaluate, export); "
            "api also takes a run name (RUN, as under artifacts/runs/)",
        )
    p.add_argument("--verbose", action="store_true", help="show Prefect's own log lines too")
    p.add_argument(
        "--debug", action="store_true", help=f"tracebacks for every error ({DEBUG_ENV}=1)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="shakespeare-gpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _common(sub.add_parser("run", help="run the whole pipeline"))
    stage = sub.add_parser("stage", help="run the pipeline up to STAGE, reusing cached upstream")
    stage.add_argument("name", help=f"one of {', '.join(STAGES)}")
    _common(stage)
    _common(sub.add_parser("sample", help="sample text (upstream stages come from the cache)"))
    serve = sub.add_parser(
        "serve", help="register the flow as a deployment with a schedule, and run its runs"
    )
    _common(serve)
    serve.add_argument("--name", default=DEPLOYMENT, help="deployment name")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", default=None, help="cron schedule, e.g. '0 3 * * *'")
    when.add_argument(
        "--interval", type=_positive_int, default=None, help="schedule every N seconds"
    )
    export = sub.add_parser(
        "export", help="write the trained model in Hugging Face GPT-2 layout (trains if needed)"
    )
    _common(export)
    export.add_argument("--out", required=True, help="output folder")
    api = sub.add_parser(
        "api",
        help="serve the trained model over HTTP: OpenAI's /v1/completions and a playground at /",
    )
    _common(api)
    for name in ("host", "port", "max_queue", "max_tokens_limit", "max_request_bytes"):
        api.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"serve.{name}",
            metavar=name.upper(),
            type=str if name == "host" else int,
            default=None,
            help=f"{help_text(ServeConfig, name)} (default {getattr(ServeConfig(), name)})",
        )
    sweep = sub.add_parser(
        "sweep", help="train and evaluate a grid of settings on a Dask cluster; a leaderboard"
    )
    _common(sweep, sampling=False)
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="a field (learning_rate, model.dropout, ...) and its values; repeatable",
    )
    sweep.add_argument("--file", default=None, help="a sweep definition: JSON with preset, "
                       "overrides, grid, samples, seed (flags given override it)")  # fmt: skip
    sweep.add_argument("--samples", type=int, default=None, help="random search: this many trials")
    sweep.add_argument("--seed", type=int, default=None, help="random search seed (default 0)")
    sweep.add_argument(
        "--dask-address", default=None, help="an existing Dask scheduler (tcp://...)"
    )
    sweep.add_argument(
        "--workers", type=int, default=None, help="local Dask workers (default: cores)"
    )
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} from the flags that were given and `--set`."""
    overrides: dict[str, dict[str, Any]] = {}
    for section, name in FLAGS:
        value = getattr(args, f"{section}.{name}", None)  # sweep has no sampling flags
        if value is not None:
            overrides.setdefault(section, {})[name] = value
    for item in args.set:
        target, sep, text = item.partition("=")
        section, _, name = target.partition(".")
        if not sep or not name:
            raise ValueError(f"--set takes SECTION.FIELD=VALUE, got {item!r}")
        overrides.setdefault(section, {})[name] = parse_value(section, name, text)
    return overrides


def flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "sweep":
        return sweep_parameters(args)
    return {
        "preset": args.preset or DEFAULT_PRESET,
        "overrides": overrides_from(args),
        "artifacts": args.artifacts,
        "from_stage": args.from_stage,
        "force": args.force,
        "model": args.model,
    }


def sweep_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep flow's parameters: the definition file, then the flags over it."""
    from tasks.sweep import parse_grid

    spec: dict[str, Any] = {}
    if args.file:
        try:
            spec = json.loads(Path(args.file).read_text())
        except OSError as err:
            raise ValueError(f"sweep file {args.file!r} cannot be read: {err.strerror}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"sweep file {args.file!r} is not JSON: {err}") from None
        unknown = set(spec) - {"preset", "overrides", "grid", "samples", "seed"}
        if unknown:
            raise ValueError(f"sweep file {args.file!r} has unknown keys {sorted(unknown)}")
    overrides = spec.get("overrides") or {}
    for section, fields in overrides_from(args).items():
        overrides[section] = {**overrides.get(section, {}), **fields}
    return {
        "preset": args.preset or spec.get("preset") or DEFAULT_PRESET,
        "overrides": overrides,
        "grid": {**(spec.get("grid") or {}), **parse_grid(args.grid)},
        "samples": args.samples if args.samples is not None else spec.get("samples"),
        "seed": args.seed if args.seed is not None else spec.get("seed", 0),
        "artifacts": args.artifacts,
    }


def api_answers(api_url: str, timeout: float = 5.0) -> bool:
    """Whether the Prefect API's health endpoint answers."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class _ProjectLinesOnly(logging.Filter):
    """Pass log records written by the project's own code (progress, reuse), not Prefect's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.pathname.startswith(PROJECT_DIRS)


def one_console() -> None:
    """On a terminal, Prefect's console handlers print through the live display's Console
    (`tasks.progress.LogHandler`): one writer on the screen, log lines above the bars."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    from tasks.progress import LogHandler, bars_enabled

    ensure_logging_setup()
    if not bars_enabled():
        return
    for logger in [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]:
        handlers = getattr(logger, "handlers", [])
        for i, handler in enumerate(handlers):
            if type(handler) is PrefectConsoleHandler:
                handlers[i] = LogHandler(level=handler.level)
                for f in handler.filters:
                    handlers[i].addFilter(f)


def quiet_prefect_console() -> None:
    """Keep Prefect's own lines (engine states, server start, tracebacks) off the terminal;
    the flow-run logs sent to the API, which the UI shows, are untouched."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_ProjectLinesOnly())


def last_stage(args: argparse.Namespace) -> str | None:
    """The last stage a command runs (None: every stage): `stage NAME`'s name, `sample`'s
    sample, and train for every other command (`export`, `serve`, `api`: a trained model)."""
    return {"run": None, "stage": getattr(args, "name", None), "sample": "sample"}.get(
        args.command, "train"
    )


def checked(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's parameters, everything that can be checked from them checked."""
    params = flow_parameters(args)
    config = RunConfig.resolve(params["preset"], params["overrides"])
    if args.command == "sweep" or args.model:
        from tasks.sweep import best_trial, check_cluster, trials
    if args.command == "sweep":
        trials(params["preset"], params["overrides"], params["grid"], params["samples"],
               params["seed"])  # fmt: skip
        check_cluster(args.dask_address, args.workers)
        check_run(config, args.artifacts)
        return params
    if args.command == "serve":
        check_serve(args)
    if args.model and args.command != "api":  # api also takes a run name (flows.api checks)
        best_trial(Path(args.artifacts) if args.artifacts else default_root(), args.model)
    until = last_stage(args)
    if until:
        check_stage(until)
    fresh_stages(until, args.from_stage, args.force)
    check_run(config, args.artifacts)
    if args.command == "export":
        check_export_target(args.out)
    return params


def check_serve(args: argparse.Namespace) -> None:
    """Raise ValueError unless `serve` can work: scheduled runs need a Prefect server that
    outlives the command (a temporary one cannot schedule them: serve polled, ran nothing
    and said nothing), one that answers, and a valid cron expression."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    start = (
        "start one with `prefect server start --host 127.0.0.1` and set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api"
    )
    if not api:
        raise ValueError(f"serve needs a Prefect server to schedule runs on: {start}")
    if not api_answers(api):
        raise ValueError(f"the Prefect API at {api} (PREFECT_API_URL) is not answering: {start}")
    if args.cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=args.cron)
        except ValueError:
            raise ValueError(f"--cron {args.cron!r} is not a cron expression") from None


def serve(args: argparse.Namespace, params: dict[str, Any]) -> int:
    # scheduled runs start in their own process: pin the artifact root to an absolute path
    from .pipeline import pipeline

    root = args.artifacts or os.environ.get("SHAKESPEARE_GPT_ARTIFACTS") or "artifacts"
    params["artifacts"] = str(Path(root).resolve())
    pipeline.serve(
        name=args.name,
        cron=args.cron,
        interval=args.interval,
        parameters=params,
        description="download, tokenize, train, evaluate and sample; cached stage by stage",
    )
    return 0


def complain(text: str) -> None:
    """Print an error to stderr; on a terminal each line wrapped between words (a word
    longer than the line, a path, is kept whole)."""
    if sys.stderr.isatty():
        import shutil
        import textwrap

        width = shutil.get_terminal_size().columns
        text = "\n".join(
            textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False) or line
            for line in text.splitlines()
        )
    print(text, file=sys.stderr)


def say(text: str, path: bool = False) -> None:
    """Print a line to stdout; on a terminal wrapped between words (a `path` is never cut,
    so that it can be copied whole)."""
    if not sys.stdout.isatty():
        print(text)
        return
    from rich.console import Console

    Console(highlight=False).print(text, markup=False, soft_wrap=path)


def report(summary: dict[str, Any]) -> None:
    if summary["sample"] is not None and summary["cached"]["sample"]:
        print(f"----- sample -----\n{summary['sample']}")  # a cache hit: nothing was streamed
    if summary["eval"] is not None:
        e = summary["eval"]
        print("----- validation -----")
        say(
            f"val_loss {e['val_loss']:.4f}  perplexity {e['perplexity']:.3f}  "
            f"bits/char {e['bits_per_char']:.4f}  ({e['tokens']} tokens)"
        )
    for stage, run in summary["reused"].items():
        say(f"reused {stage} from run {run}")
    say(f"cached: {json.dumps(summary['cached'])}")
    say(f"manifest: {summary['manifest']}", path=True)
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    if ui:
        say(f"flow run: {ui}/runs/flow-run/{summary['flow_run_id']}", path=True)


def report_sweep_result(record: dict[str, Any]) -> None:
    from tasks.sweep import BEST_OF, leaderboard_rows

    rows = leaderboard_rows(record["trials"])
    print("----- leaderboard -----")
    for r in rows:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(f"{r['rank'] or '-':>3}  {loss}  {r['trial']}  {r['status']}")
    if record["best"]:
        print(f"best: {record['best']}  (use --model {BEST_OF}{record['name']})")


def import_flows(command: str) -> None:
    """Import the flow `command` runs (Prefect, MLX, the tasks: most of a run's start) and
    what Prefect imports only at a flow's and a task's first call, after its server
    answers: its flow and task engines, FastAPI's encoder for the flow's parameters (with
    Starlette) and its graph drawing (graphviz)."""
    if command == "sweep":
        from . import sweep  # noqa: F401
    else:
        from . import pipeline  # noqa: F401
    import fastapi.encoders  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401
    import prefect.utilities.visualization  # noqa: F401


def prepare(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """What a command that may train in this process loads from the GPU's libraries ahead
    of its flow (`tasks.train.prepare_device`); a sweep trains in its Dask workers, `serve`
    in the flow runs it starts, `api` not at all. A command whose stages include training
    (`run`, `sample`, `export`, `stage` train or later; not a sweep's trial, `--model`)
    also runs the run's compiled step once there when its kernels are cached (a cached
    train stage then trains nothing, and the step ran for nothing while the server
    booted)."""
    if args.command not in ("run", "stage", "sample", "export"):
        return
    from tasks.train import prepare_device

    until = last_stage(args)
    trains = until is None or STAGES.index(until) >= STAGES.index("train")
    if trains and not getattr(args, "model", None):
        config = RunConfig.resolve(params["preset"], params["overrides"])
        prepare_device(config.model, config.training, config.parallel)
    else:
        prepare_device()


def execute(args: argparse.Namespace, params: dict[str, Any]) -> int:
    if args.command == "serve":
        return serve(args, params)
    if args.command == "api":
        from .api import api

        given = {k.removeprefix("serve."): v for k, v in vars(args).items() if k[:6] == "serve."}
        return api(params, {k: v for k, v in given.items() if v is not None}, args.verbose)
    if args.command == "sweep":
        from tasks.progress import ENV as PROGRESS

        from .sweep import dask_runner, sweep_pipeline

        # the trials' workers share the terminal: a bar each would draw over the others
        os.environ.setdefault(PROGRESS, "0")
        runner = dask_runner(args.dask_address, args.workers)
        record = sweep_pipeline.with_options(task_runner=runner)(**params)
        report_sweep_result(record)
        return 0
    from .pipeline import export_pipeline, pipeline

    if args.command == "export":
        out = export_pipeline(
            out=args.out,
            **{k: params[k] for k in ("preset", "overrides", "artifacts", "force", "model")},
        )
        print(f"exported the trained model as GPT2LMHeadModel to {out}")
        return 0
    report(pipeline(**params, until=last_stage(args), stream=True))
    return 0


def explain(err: BaseException, args: argparse.Namespace) -> str | None:
    """The one line for an expected error, or None for a bug (which keeps its traceback)."""
    from tasks.download import TransientDownloadError, UnreachableError

    if isinstance(err, TransientDownloadError | UnreachableError):
        return f"{err}\nhint: no network? pass a local copy with --source PATH (or file:///PATH)"
    if isinstance(
        err, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
    ):
        return str(err)
    return None


def failure_line(err: BaseException) -> str | None:
    """The one line for a run that failed for a reason the user can act on (a loss that
    diverged, a full disk), or None."""
    from tasks.errors import describe_os_error
    from tasks.train import TrainingDiverged

    if isinstance(err, TrainingDiverged):
        return str(err)
    return describe_os_error(err) if isinstance(err, OSError) else None


def interrupted(err: BaseException) -> tuple[str, int]:
    """The line and exit code (128 + the signal's number) for a run stopped by Ctrl-C or
    SIGTERM; the step comes from the training loop's `TrainingInterrupted`, found among
    the exceptions chained to this one (a second Ctrl-C during shutdown raises anew)."""
    from tasks.train import TrainingInterrupted

    step, number = None, getattr(err, "signal", None) or signal.SIGINT
    seen: BaseException | None = err
    while seen is not None and step is None:
        step = getattr(seen, "step", None)
        number = getattr(seen, "signal_number", None) or number
        seen = seen.__context__
    if step is None and TrainingInterrupted.last is not None:
        step = TrainingInterrupted.last.step  # a second signal cut the chain
    at = f" at step {step}" if step is not None else ""
    return f"interrupted{at}; {RESUME}", 128 + int(number)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `flows.entry.Terminated` while the command runs (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV) == "1"
    try:
        params = checked(args)
    except ValueError as err:
        if debug:
            traceback.print_exc()
        complain(f"error: {err}")
        return 2
    if args.verbose and DASK_QUIETED:
        os.environ[DASK_LOGGING] = "info"
    if not args.verbose:  # the sweep's local Dask workers quiet their console too
        os.environ.setdefault("DASK_DISTRIBUTED__WORKER__PRELOAD", '["flows.quiet_worker"]')
    from .temporary_server import start_if_needed

    # it boots while the pipeline is imported; it stops at exit, after Prefect has sent
    # the run's last log lines (their atexit handlers run before its own, registered first)
    server = start_if_needed()
    one_console()
    if not args.verbose:
        quiet_prefect_console()
    from prefect.exceptions import TerminationSignal

    try:
        with sigterm_as_interrupt():
            if server:  # on this core while the server boots on the other:
                import_flows(args.command)
                prepare(args, params)
                server.wait()
            return execute(args, params)
    except (KeyboardInterrupt, TerminationSignal) as err:
        if threading.current_thread() is threading.main_thread():
            # what is left (stopping the temporary server at exit) takes seconds: a
            # signal now would only turn it into a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if debug:
            traceback.print_exc()
        line, code = interrupted(err)
        complain(line)
        return code
    except Exception as err:
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
        if api and not api_answers(api):
            root = args.artifacts or os.environ.get("SHAKESPEARE_GPT_ARTIFACTS") or "artifacts"
            which = (
                "the temporary Prefect server this command started"
                if server
                else f"the Prefect API at {api}"
            )
            again = (
                "rerun the same command"
                if server
                else ("rerun the same command when the server is back (or unset PREFECT_API_URL)")
            )
            print(
                f"error: {which} is not answering ({type(err).__name__}: {err}).\n"
                f"Stages that finished are kept under {Path(root).resolve()} and are verified by "
                f"digest before reuse; {again} to continue from them.",
                file=sys.stderr,
            )
            return 3
        if (line := failure_line(err)) is not None and not debug:
            complain(f"error: {line}")
            return 1
        message = explain(err, args)
        if message is None or debug:
            raise
        complain(f"error: {message}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
