"""The temporary Prefect server a command runs against when no Prefect API is configured.

Prefect starts one itself on the first API call (`SubprocessASGIServer`), after the whole
pipeline has been imported, and waits for it: on two cores the server's start (its own
imports, the SQLite migrations check) and the command's imports then run one after the
other. Started here instead, as soon as the command line is checked (before Prefect itself
is imported, unless PREFECT_API_URL names a server), the server boots on one core while
the command imports Prefect and the pipeline on the other. It is the same server
(`uvicorn` over `prefect.server.api.server:create_app`, the UI off, the same database),
stopped when the command ends. A long-lived `prefect server start` with PREFECT_API_URL
set skips all of this (docs/CLI.md).

The server runs in a session of its own: in the terminal's process group, Ctrl-C (SIGINT
to the whole group) stopped it together with the command, whose engine then retried the
dead API for minutes ("Error logging to API", httpx.ConnectError) before it could exit.
It still stops when the command ends (`atexit`), and on Linux the kernel stops it if the
command is killed outright (PR_SET_PDEATHSIG).

On a machine where Prefect has no database yet, the server's first start creates one by
running every migration of Prefect's schema, 116 for SQLite in Prefect 3.9: 7.2 s on a
2-core AMD EPYC, the largest part of a fresh machine's first command. So an empty
database already migrated (`TEMPLATE`, 16 KB compressed, made by `make_template` with
Prefect's own migrations) is put in place first (`seed_database`); the server then runs
only the migrations of a newer Prefect, if any. An existing database, settings that may
name another database, or a Prefect that does not know the template's revision is left
to Prefect.

Prefect's automations services (its reactive and proactive triggers and their actions)
start with the server and take its event loop for a while before it answers: without
them it answered 0.09 to 0.96 s sooner on a 2-core AMD EPYC, alternating 4 rounds
(`docs/runs/automations-off-cpu-20261201.txt`). With no automation in the database they
have nothing to do, so the temporary server runs without them (`automations_off`); a
database that holds one, or the user's own setting of them, keeps them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import gzip
import importlib.util
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ADDRESS_IN_USE = 3  # uvicorn's exit status when its port was taken meanwhile
# what Prefect starts its own temporary server with (`SubprocessASGIServer`): no UI
EPHEMERAL = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
# the setting of Prefect's automations services: reactive and proactive triggers, actions
AUTOMATIONS = "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"


PR_SET_PDEATHSIG = 1  # linux/prctl.h
# an empty Prefect database migrated to TEMPLATE_REVISION (Prefect 3.9.1's head)
TEMPLATE = Path(__file__).with_name("prefect-database.sqlite.gz")
TEMPLATE_REVISION = "27d8f4e1a6c9"
# files where Prefect's settings may name another database (beside the environment)
SETTINGS_FILES = ("prefect.toml", ".env", "pyproject.toml")


def _names_database(setting: str) -> bool:
    """Whether an environment variable is one of Prefect's database settings."""
    return setting.startswith("PREFECT_") and "DATABASE" in setting


def _prefect_package() -> Path:
    """Prefect's package folder, found and not imported; ModuleNotFoundError naming the
    install command where it is missing."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "Prefect is not installed in this environment: pip install -e . (from the "
            "project's checkout)",
            name="prefect",
        )
    return Path(spec.origin).parent


def _migrations() -> Path:
    return _prefect_package() / "server" / "database" / "_migrations" / "versions" / "sqlite"


def _home(env: dict[str, str]) -> Path:
    """Prefect's home folder under `env` (`PREFECT_HOME`, `~/.prefect` by default)."""
    return Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _settings_mention(env: dict[str, str], *words: str) -> bool:
    """Whether one of the files where Prefect's settings live under `env` mentions one of
    `words` (lower case): the profiles file, and this folder's `prefect.toml`, `.env` and
    `pyproject.toml`'s `[tool.prefect]`. A mention is taken as a setting, so that a doubt
    leaves the matter to Prefect."""
    profiles = Path(env.get("PREFECT_PROFILES_PATH") or _home(env) / "profiles.toml")
    for settings in (profiles.expanduser(), *map(Path, SETTINGS_FILES)):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = settings.read_text().lower()
            prefect_part = settings.name != "pyproject.toml" or "tool.prefect" in text
            if prefect_part and any(word in text for word in words):
                return True
    return False


def default_database(env: dict[str, str]) -> Path | None:
    """The SQLite file Prefect's server will use under `env`: `$PREFECT_HOME/prefect.db`
    (`~/.prefect` by default); None when the settings may name another database or home
    (a `PREFECT_*DATABASE*` variable, or "database" or "home" in one of Prefect's
    settings files, `_settings_mention`)."""
    if any(_names_database(k) for k, v in env.items() if v):
        return None
    if _settings_mention(env, "database", "home"):
        return None
    return _home(env) / "prefect.db"


def seed_database(env: dict[str, str]) -> Path | None:
    """Put the migrated empty database (`TEMPLATE`) where Prefect will look for its SQLite
    database (`default_database`) when there is none yet; returns its path, or None when
    it was left to Prefect: a database exists, the installed Prefect has no migration of
    the template's revision (an older Prefect), the settings may name another database,
    or the folder cannot take it (a file, read-only: Prefect then says what is wrong).
    Never replaces a file: a database that another command made meanwhile stays."""
    database = default_database(env)
    if database is None or database.exists() or database.is_symlink():
        return None
    if not any(_migrations().glob(f"*_{TEMPLATE_REVISION}_*.py")):
        return None
    home = database.parent
    tmp = home / f".prefect.db.{os.getpid()}.tmp"
    try:
        home.mkdir(parents=True, exist_ok=True)
        with gzip.open(TEMPLATE) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.link(tmp, database)  # whole, and never over another's
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this
            tmp.unlink(missing_ok=True)
    return database


def has_automations(database: Path) -> bool:
    """Whether Prefect's SQLite `database` holds an enabled automation (a row of its
    `automation` table). True when that cannot be read within 0.2 s (no such table, a
    damaged file, another process holding its lock), so that a doubt keeps the
    automations services; a missing file holds none."""
    if not database.exists():
        return False
    try:
        uri = f"{database.resolve().as_uri()}?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=0.2)
        try:
            query = "SELECT 1 FROM automation WHERE enabled LIMIT 1"
            return db.execute(query).fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return True


def automations_off(env: dict[str, str]) -> dict[str, str]:
    """`env` with Prefect's automations services off (`AUTOMATIONS`: its triggers and their
    actions) when the server's database is the default SQLite file and holds no
    automation; unchanged when the user set `AUTOMATIONS` (in the environment, or
    "triggers" in one of Prefect's settings files, which the variable would override) or
    the database may hold one."""
    if AUTOMATIONS in env or _settings_mention(env, "triggers"):
        return env
    database = default_database(env)
    if database is None or has_automations(database):
        return env
    return {**env, AUTOMATIONS: "false"}


def make_template(out: Path) -> None:
    """Write `out`: an empty database made by Prefect's own migrations (a Prefect server's
    first start does the same), compressed; and print its revision, for TEMPLATE_REVISION.

        python -m flows.temporary_server flows/prefect-database.sqlite.gz
    """
    import tempfile

    with tempfile.TemporaryDirectory() as home:
        create = (
            "import asyncio\n"
            "from prefect.server.database import provide_database_interface\n"
            "asyncio.run(provide_database_interface().create_db())\n"
        )
        env = {k: v for k, v in os.environ.items() if not _names_database(k)}
        env["PREFECT_HOME"] = home
        subprocess.run([sys.executable, "-c", create], env=env, check=True)

        db = sqlite3.connect(Path(home) / "prefect.db")
        db.execute("VACUUM")
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        db.close()
        with open(Path(home) / "prefect.db", "rb") as src, gzip.open(out, "wb", 9) as dst:
            shutil.copyfileobj(src, dst)
    print(revision)


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: on Linux, ask for SIGTERM when the parent dies (out of
    the parent's process group, a SIGKILLed command would otherwise leave it running);
    and exit at once if the parent (process id `parent`) died before the request."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """A Prefect API server in a child process on 127.0.0.1; `wait()` until it answers."""

    def __init__(self, env: dict[str, str], startup_timeout: float = 20.0):
        self.timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.port = 0
        seed_database(env)
        self.env = automations_off(env)
        atexit.register(self.stop)  # first: a signal during the spawn still stops it
        self._spawn()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> None:
        prefect = _prefect_package()
        self.port = _free_port()
        command = [
            sys.executable, "-m", "uvicorn",
            "--app-dir", str(prefect.parent),
            "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        # the parent-death signal comes when the spawning *thread* ends: only the main
        # thread's lasts as long as the process
        linux_main = (
            sys.platform == "linux" and threading.current_thread() is threading.main_thread()
        )
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # no signal from the terminal (Ctrl-C)
            preexec_fn=functools.partial(_die_with_parent, os.getpid()) if linux_main else None,
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait(self) -> None:
        """Block until the server answers; raise RuntimeError with its stderr if it exits or
        does not answer within the startup timeout (Prefect's own setting)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == ADDRESS_IN_USE:
                self._spawn()
            elif code is not None:
                err = self.process.stderr.read().decode(errors="replace").strip()
                raise RuntimeError(f"the temporary Prefect server exited with {code}: {err}")
            elif self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer in {self.timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()
        self.process = None


def _start_before_prefect() -> TemporaryServer | None:
    """A server started from the environment alone, before Prefect is imported, when no
    PREFECT_API_URL names one; None otherwise (`start_if_needed` then asks Prefect)."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    return TemporaryServer({**os.environ, **EPHEMERAL})


# commands that never use a temporary server: `serve` needs a long-lived one
NO_SERVER = ("serve",)
_early: list[TemporaryServer] = []  # the one `start_early` started, until `start_if_needed`


def start_early(argv: Sequence[str]) -> TemporaryServer | None:
    """Start the temporary server for the command line `argv` before the command imports
    anything else (`flows.entry`), when it names a command that will ask for one
    (`start_if_needed`): a first argument that is a command other than those in
    `NO_SERVER`, no `-h`/`--help` (nor an abbreviation argparse takes for it), no
    PREFECT_API_URL, Prefect not imported. The command line is checked after; a refused
    one stops the server (`discard_early`), which may have made Prefect's database."""
    argv = list(argv)
    if (
        not argv
        or argv[0].startswith("-")
        or argv[0] in NO_SERVER
        or any(a == "-h" or (len(a) > 2 and "--help".startswith(a)) for a in argv)
    ):
        return None
    server = _start_before_prefect()
    if server is not None:
        _early.append(server)
    return server


def discard_early() -> None:
    """Stop the server `start_early` started if no command took it (a refused command
    line), so that nothing outlives `flows.entry.main`."""
    while _early:
        _early.pop().stop()


def start_if_needed() -> TemporaryServer | None:
    """Start a temporary server when Prefect has no API URL and may start one (its
    `server.ephemeral.enabled` setting), and point this process and its children at it;
    None when an API is configured (or Prefect is to raise its own error).

    Without PREFECT_API_URL in the environment, and Prefect not imported yet, the server is
    started first (or was, by `start_early`) and Prefect imported while it boots; if
    Prefect's settings then name an API after all (a profile, prefect.toml, a test
    harness), it is stopped again.
    """
    server = _early.pop() if _early else _start_before_prefect()
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        if server:
            server.stop()
        return None
    if server is None:
        env = {**os.environ, **settings.to_environment_variables(exclude_unset=True)}
        server = TemporaryServer({**env, **EPHEMERAL})
    server.timeout = settings.server.ephemeral.startup_timeout_seconds
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ["PREFECT_UI_URL"] = ""  # no links to a server that stops with the command
    refresh_global_settings_context()
    return server


if __name__ == "__main__":
    make_template(Path(sys.argv[1]))
