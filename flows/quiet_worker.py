"""A Dask worker preload (`distributed.worker.preload`): the command line names it for the
sweep's local workers unless `--verbose`, so that their console shows the project's own
log lines and not Prefect's engine lines, as the command's own process does.

It also drops one line Dask's worker logs at ERROR, with a traceback, when its heartbeat
finds the scheduler's connection closed: at the end of a sweep a local cluster closes its
scheduler while a worker's heartbeat may be under way (a race Dask's own issues describe,
dask/distributed#7105), so a sweep that succeeded sometimes ended on that traceback. A
scheduler lost during the sweep still fails its trials, which the leaderboard reports.
"""

from __future__ import annotations

import logging

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"


class ClosedSchedulerHeartbeat(logging.Filter):
    """Drop the worker's record of a heartbeat that found the scheduler gone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(HEARTBEAT_FAILED)


def dask_setup(worker) -> None:
    from .cli import quiet_prefect_console

    quiet_prefect_console()
    logging.getLogger("distributed.worker").addFilter(ClosedSchedulerHeartbeat())
