"""A Dask worker preload (`distributed.worker.preload`): the command line names it for the
sweep's local workers unless `--verbose`, so that their console shows the project's own
log lines and not Prefect's engine lines, as the command's own process does."""

from __future__ import annotations


def dask_setup(worker) -> None:
    from .cli import quiet_prefect_console

    quiet_prefect_console()
