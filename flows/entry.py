"""The `shakespeare-gpt` command's entry point (`python -m flows` too): Prefect's temporary
server is started before anything else is imported, then `flows.cli.main` runs.

The command line is checked by `flows.cli`, whose configuration imports MLX (0.37 s on an
H200 machine, where MLX loads the CUDA libraries: `docs/runs/cli-timeline-h200-20261201n-
warm-1.txt`; 0.13 s for all of `flows.cli` on a 2-core AMD EPYC). The temporary server
takes seconds to boot, and nothing the command does reaches it before it answers, so it
starts first, for every command that will need it (`start_early`); a command whose
arguments are then refused stops it again and prints its one-line error as before.
`--help`, `serve` (which needs a long-lived server) and a set `PREFECT_API_URL` start
nothing here. The early start only saves time: where it fails, the command checks its
arguments and starts the server as it would have (`start_if_needed`, which reports a
failure after the check).

Ctrl-C or SIGTERM before the command's own handling begins (its imports, the check) ends
it with the same line and exit code as later (130 or 143), and stops the server.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import command_env  # noqa: F401  (the environment the server inherits)
from .temporary_server import discard_early, start_early

RESUME = "rerun the same command to resume"  # the end of an interrupted command's line


class Terminated(KeyboardInterrupt):
    """SIGTERM, met like Ctrl-C: the run stops, Prefect's temporary server is stopped at
    exit, one line is printed. (Prefect's own SIGTERM bridge, during a flow run, hands
    the signal back to the handler it found: `terminate`, here and in `flows.cli`.)"""

    signal_number = signal.SIGTERM


def terminate(number: int, frame: Any) -> None:
    """The SIGTERM handler: raise `Terminated`."""
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run `shakespeare-gpt` with `argv` (`sys.argv[1:]` when None); its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        try:
            start_early(argv)
        except Exception:  # noqa: BLE001  (start_if_needed starts it, or says why, later)
            discard_early()
        from .cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt as err:
        print(f"interrupted; {RESUME}", file=sys.stderr)
        return 128 + int(getattr(err, "signal_number", signal.SIGINT))
    finally:
        discard_early()
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
