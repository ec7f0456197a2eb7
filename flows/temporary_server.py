"""Prefect's temporary server, started in a session of its own.

With no PREFECT_API_URL, Prefect starts a temporary API server as a child process
(`prefect.server.api.server.SubprocessASGIServer`, `uvicorn` on 127.0.0.1). Started as
Prefect starts it, the child is in the terminal's process group: Ctrl-C (SIGINT to the
whole group) stopped it together with the CLI, and the CLI's engine then retried the
dead API for minutes ("Error logging to API", httpx.ConnectError) before it could exit.
In a session of its own the child gets no signal from the terminal; Prefect still stops
it when the CLI exits (`atexit`, SIGTERM to the child itself), and on Linux the kernel
stops it if the CLI is killed outright (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

from prefect.server.api import server as prefect_server


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, ask for SIGTERM when the parent dies (out of
    the parent's process group, a SIGKILLed CLI would otherwise leave it running)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _NewSessionSubprocess:
    """The `subprocess` module, but whose Popen starts a new session."""

    def __init__(self, **popen: Any) -> None:
        self.Popen = functools.partial(subprocess.Popen, start_new_session=True, **popen)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


@contextlib.contextmanager
def _popen_in_new_session() -> Iterator[None]:
    saved = prefect_server.subprocess
    # the parent-death signal is sent when the spawning *thread* ends: only the main
    # thread's lasts as long as the process
    linux_main = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
    popen = {"preexec_fn": _die_with_parent} if linux_main else {}
    prefect_server.subprocess = _NewSessionSubprocess(**popen)  # type: ignore[assignment]
    try:
        yield
    finally:
        prefect_server.subprocess = saved


class OwnSessionServer(prefect_server.SubprocessASGIServer):
    """Prefect's temporary server, its process started in a new session."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        with _popen_in_new_session():
            return super()._run_uvicorn_command()


def use_own_session_server() -> None:
    """Make the temporary server Prefect starts from now on (if it starts one: not with
    PREFECT_API_URL set, nor under a test harness that registered its own) an
    `OwnSessionServer`. Prefect keeps one instance per port, `None` for "any free port":
    registering ours under `None` first is what `prefect_test_harness` does with its own."""
    OwnSessionServer()  # SubprocessASGIServer.__new__ registers it under port None
