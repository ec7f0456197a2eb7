"""The `shakespeare-gpt` command's entry point (`python -m flows` too): Prefect's temporary
server is started before anything else is imported, then `flows.cli.main` runs.

The command line is checked by `flows.cli`, whose configuration imports MLX (0.37 s on an
H200 machine, where MLX loads the CUDA libraries; 0.13 s for all of `flows.cli` on a
2-core AMD EPYC). The temporary server takes seconds to boot, and nothing the command
does reaches it before it answers, so it starts first, for every command that will need
it (`start_early`); a command whose arguments are then refused stops it again (at exit)
and prints its one-line error as before. `--help`, `serve` (which needs a long-lived
server) and a set `PREFECT_API_URL` start nothing here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import command_env  # noqa: F401  (the environment the server inherits)
from .temporary_server import discard_early, start_early


def main(argv: Sequence[str] | None = None) -> int:
    """Run `shakespeare-gpt` with `argv` (`sys.argv[1:]` when None); its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    start_early(argv)
    try:
        from .cli import main as cli_main

        return cli_main(argv)
    finally:
        discard_early()
