"""`shakespeare-gpt`'s entry point (`flows.entry`): the temporary Prefect server starts
before the command's own imports, only for commands that use it, and never outlives a
refused command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flows.temporary_server as ts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def spawned(monkeypatch):
    """Prefect not yet imported, no API configured, and a stand-in server class: the list
    of the environments `start_early` would have started a server with."""
    started = []

    class Server:
        def __init__(self, env):
            started.append(env)

        def stop(self):
            started.append("stopped")

    monkeypatch.setattr(ts, "TemporaryServer", Server)
    monkeypatch.delitem(sys.modules, "prefect", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return started


def test_only_a_command_that_will_ask_for_the_server_starts_it_early(spawned, monkeypatch):
    for argv in ([], ["--help"], ["-h"], ["run", "--help"], ["stage", "-h", "train"],
                 ["run", "--he"], ["run", "--h"], ["serve", "--cron", "0 * * * *"],
                 ["--version"]):  # fmt: skip
        assert ts.start_early(argv) is None, argv
    assert spawned == []
    for argv in (["run"], ["stage", "train", "--preset", "tiny"], ["sample"], ["export"]):
        assert ts.start_early(argv) is not None, argv
        assert ts._early.pop() is not None
    assert len(spawned) == 4 and spawned[0]["PREFECT__SERVER_EPHEMERAL"] == "1"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert ts.start_early(["run"]) is None
    assert len(spawned) == 4


def test_a_server_no_command_took_is_stopped(spawned):
    server = ts.start_early(["run", "--preset", "nope"])
    ts.discard_early()
    assert spawned[-1] == "stopped" and not ts._early
    assert server is not None


def _command(tmp_path: Path, *argv: str, then: str = "") -> subprocess.CompletedProcess:
    """`flows.entry.main(argv)` in a child process with its own PREFECT_HOME, printing
    whether MLX was imported when the server's process was started, and its process id;
    `then`: a statement run right after that."""
    probe = (
        "import os, signal, sys, flows.temporary_server as ts\n"
        "spawn = ts.TemporaryServer._spawn\n"
        "def spawn_probed(self):\n"
        "    spawn(self)\n"
        "    print('spawned', 'mlx.core' in sys.modules, self.process.pid, flush=True)\n"
        f"    {then or 'pass'}\n"
        "ts.TemporaryServer._spawn = spawn_probed\n"
        "from flows.entry import main\n"
        f"raise SystemExit(main({list(argv)!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), SHAKESPEARE_GPT_PROGRESS="0")
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" if sys.platform == "linux" else True
    )


def test_the_server_starts_before_mlx_is_imported_and_the_command_runs_on_it(
    tmp_path, corpus_path, corpus_sha
):
    argv = ["stage", "vocab", "--preset", "tiny", "--artifacts", str(tmp_path / "art")]
    proc = _command(tmp_path, *argv, "--source", str(corpus_path), "--sha256", corpus_sha)
    assert proc.returncode == 0, proc.stderr
    spawns = [line.split() for line in proc.stdout.splitlines() if line.startswith("spawned")]
    assert len(spawns) == 1 and spawns[0][1] == "False"  # one server, before MLX
    assert not _alive(int(spawns[0][2]))


def test_a_refused_command_line_says_so_in_one_line_and_leaves_no_server(tmp_path):
    proc = _command(tmp_path, "run", "--preset", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown preset 'nope'; choose one of "
        "['gpt2-char', 'nanogpt-char', 'nanogpt-char-fast', 'quick', 'seed', 'tiny']"
    ]
    (spawn,) = [line.split() for line in proc.stdout.splitlines() if line.startswith("spawned")]
    assert not _alive(int(spawn[2]))


def test_a_missing_prefect_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(ts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"Prefect is not installed.*pip install -e \."):
        ts._prefect_package()


def test_sigterm_during_the_commands_imports_ends_it_in_one_line_and_stops_the_server(
    tmp_path,
):
    """SIGTERM right after the early server's start, before `flows.cli` handles signals:
    the command's interrupted line, exit 143 (128 + SIGTERM), the server gone."""
    proc = _command(
        tmp_path, "run", "--preset", "tiny", then="os.kill(os.getpid(), signal.SIGTERM)"
    )
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["interrupted; rerun the same command to resume"]
    (spawn,) = [line.split() for line in proc.stdout.splitlines() if line.startswith("spawned")]
    assert not _alive(int(spawn[2]))


def test_an_early_start_that_fails_leaves_the_command_line_check_to_speak_first(tmp_path):
    """Where the early start fails (here Prefect cannot be found), a refused command line
    still gets its one line and exit 2; the failure is reported only by a command that
    goes on to need the server."""
    probe = (
        "import flows.temporary_server as ts\n"
        "def missing():\n"
        "    raise ModuleNotFoundError('Prefect is not installed in this environment')\n"
        "ts._prefect_package = missing\n"
        "from flows.entry import main\n"
        "raise SystemExit(main(['run', '--preset', 'nope']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[0].startswith("error: unknown preset 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_server_exits_at_once_if_its_parent_died_before_it_asked_to_be_told():
    """`_die_with_parent` in a forked child: given a parent id that is not its parent's
    (the command died between the fork and the request), the child exits 1 at once;
    given its real parent's, it goes on."""
    for parent, status in ((os.getpid(), 0), (os.getpid() + 10**6, 1)):
        child = os.fork()
        if child == 0:  # pragma: no cover  (the child)
            try:
                ts._die_with_parent(parent)
            finally:
                os._exit(0)
        _, code = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(code) == status, parent
