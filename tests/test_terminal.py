"""What a person sees: the CLI run in a real pseudo-terminal of a fixed width, its output
fed through a terminal emulator (pyte) and the screen read back; and through a pipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pexpect
import pyte
import pytest

ROWS = 400  # tall enough that nothing scrolls off: the final screen holds the whole run
BAR = "━"  # rich's bar glyph
STAMP = re.compile(r"\d\d:\d\d:\d\d ")  # a log line on the terminal starts with its time
NOISE = (
    "anonymous usage",  # Prefect's telemetry notice
    "distributed.",  # Dask's own loggers
    "Starting temporary server",
    "Created task run",  # Prefect's engine lines
    "Finished in state",
    "Beginning flow run",
)
# Variables that would hide the noise from the child (the test process imported flows.cli,
# which sets the first ones; a CI machine sets the others, which silence Prefect's notice)
HIDING = ("DO_NOT_TRACK", "DASK_LOGGING__DISTRIBUTED", "SHAKESPEARE_GPT_PROGRESS", "COLUMNS")
HIDING += ("LINES", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "TF_BUILD", "CI_NAME")


def child_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HIDING}
    # a Prefect home of its own: the telemetry notice shows on a home's first run only
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "TERM": "xterm-256color"}


def run_args(tmp_path, corpus_path, corpus_sha) -> list[str]:
    return ["-m", "flows", "run", "--preset", "tiny", "--max-iters", "60",
            "--artifacts", str(tmp_path / "artifacts"), "--source", str(corpus_path),
            "--sha256", corpus_sha, "--max-tokens", "200"]  # fmt: skip


def run_in_terminal(args: list[str], env: dict[str, str], columns: int):
    """Run in a pseudo-terminal `columns` wide; return (every screen seen, final screen,
    raw bytes, exit status). A screen is the list of its rows, right-trimmed."""
    screen = pyte.Screen(columns, ROWS)
    stream = pyte.ByteStream(screen)
    child = pexpect.spawn(sys.executable, args, env=env, dimensions=(ROWS, columns), timeout=300)
    screens, raw = [], b""
    while True:
        try:
            chunk = child.read_nonblocking(1 << 16, timeout=300)
        except pexpect.EOF:
            break
        raw += chunk
        stream.feed(chunk)
        screens.append([row.rstrip() for row in screen.display])
    child.close()
    return screens, screens[-1], raw.decode(errors="replace"), child.exitstatus


def entry(rows: list[str], start: int) -> str:
    """The log line that begins at row `start`, its wrapped rows joined by spaces."""
    parts = [rows[start]]
    for row in rows[start + 1 :]:
        if not row or STAMP.match(row) or row.startswith(("✓", "✗", "-----")):
            break
        parts.append(row)
    return " ".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 120])
def test_terminal_log_lines_above_the_bars(tmp_path, corpus_path, corpus_sha, columns):
    env = child_env(tmp_path)
    args = run_args(tmp_path, corpus_path, corpus_sha)
    screens, final, raw, status = run_in_terminal(args, env, columns)
    assert status == 0, "\n".join(final)
    # the bars were drawn while the stages ran ...
    assert any(BAR in row for screen in screens for row in screen)
    # ... and no log line ever shared a row with one, on any screen seen
    for screen in screens:
        for row in screen:
            assert not (BAR in row and STAMP.search(row)), row
    # the bars are gone at the end; each finished stage left one summary line
    assert not any(BAR in row for row in final)
    summaries = [row for row in final if row.startswith("✓ ")]
    assert [s.split()[1] for s in summaries] == ["download", "train", "evaluate", "sample"]
    assert "step 60/60" in summaries[1] and "tok/s" in summaries[1]
    # a log line longer than the terminal wraps between words, never inside one
    start = next(i for i, row in enumerate(final) if "training on mlx" in row)
    line = entry(final, start)
    assert len(line) > columns or columns == 120
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d train-\w+ training on mlx [\d.]+, device .+, backend \w+, "
        r"lanes \d+, dtype float32, processes 1",
        line,
    ), line
    assert "----- sample -----" in final and "----- validation -----" in final
    for noise in NOISE:
        assert noise not in raw, noise


@pytest.mark.slow
def test_pipe_gives_plain_lines(tmp_path, corpus_path, corpus_sha):
    env = child_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, *run_args(tmp_path, corpus_path, corpus_sha)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\x1b[" not in proc.stdout and "\x1b[" not in proc.stderr
    assert BAR not in proc.stderr
    # Prefect's own format for the project's lines, one per line
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} \| INFO +\| Task run 'train-\w+' - step 60/60 ",
                     proc.stderr, re.MULTILINE)  # fmt: skip
    assert "----- sample -----" in proc.stdout and "cached: " in proc.stdout
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
    # the same rerun (every stage reused) with --verbose shows Prefect's engine lines
    verbose = subprocess.run(
        [sys.executable, *run_args(tmp_path, corpus_path, corpus_sha), "--verbose"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Finished in state Cached" in verbose.stderr


@pytest.mark.slow
def test_sweep_keeps_dask_and_engine_lines_off(tmp_path, corpus_path, corpus_sha):
    proc = subprocess.run(
        [sys.executable, "-m", "flows", "sweep", "--preset", "tiny", "--max-iters", "10",
         "--grid", "learning_rate=0.003", "--workers", "1", "--artifacts", str(tmp_path / "a"),
         "--source", str(corpus_path), "--sha256", corpus_sha],
        env=child_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "----- leaderboard -----" in proc.stdout
    assert "Task run 'train-" in proc.stderr  # the trial's own lines, from its worker
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise


def test_help_and_a_bad_flag_load_no_heavy_module():
    """`--help` and argparse's errors come before Prefect, NumPy and the pipeline are imported."""
    probe = (
        "import sys\n"
        "from flows.cli import build_parser\n"
        "for argv in (['--help'], ['run', '--help'], ['run', '--max-iters', 'x']):\n"
        "    try:\n"
        "        build_parser().parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('prefect', 'numpy', 'pyarrow', 'matplotlib', 'dask', 'torch')\n"
        "               if m in sys.modules)\n"
        "print('heavy:', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "heavy: []" in proc.stderr, proc.stderr[-2000:]


def test_a_quiet_sweep_worker_drops_only_the_closed_schedulers_heartbeat_line():
    """At a sweep's end Dask's worker may log "Failed to communicate with scheduler during
    heartbeat" with a traceback (its scheduler closed first); the quiet workers' preload
    drops that record and no other of Dask's worker logger."""
    import logging

    from flows.quiet_worker import ClosedSchedulerHeartbeat

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, message,
                                 None, None)  # fmt: skip

    keep = ClosedSchedulerHeartbeat().filter
    assert not keep(record("Failed to communicate with scheduler during heartbeat."))
    assert keep(record("Unexpected exception during heartbeat. Closing worker."))
    assert keep(record("Worker stream died during communication: tcp://127.0.0.1:1"))
