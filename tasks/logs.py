"""The run logger inside a Prefect run, a plain logger when a task's `.fn` is called directly."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("shakespeare_gpt")
