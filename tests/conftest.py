from __future__ import annotations

import hashlib
import http.server
import os
import sys
import threading
from pathlib import Path

import pytest

import mlx_model  # noqa: F401  (before any test imports mlx.core: it preloads OpenBLAS)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(
    os.environ.get("SHAKESPEARE_CORPUS", ROOT.parent / "shared/data/tinyshakespeare/input.txt")
)


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    if not CORPUS.exists():
        pytest.fail(f"corpus not found at {CORPUS}; set SHAKESPEARE_CORPUS")
    return CORPUS


@pytest.fixture(scope="session")
def corpus_sha(corpus_path) -> str:
    return hashlib.sha256(corpus_path.read_bytes()).hexdigest()


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Serves `payload`; `plan` is a list of behaviours consumed one per request."""

    payload = b""
    plan: list[str] = []
    requests = 0

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        cls = type(self)
        cls.requests += 1
        mode = cls.plan.pop(0) if cls.plan else "ok"
        if mode == "500":
            self.send_error(500, "boom")
            return
        if mode == "404":
            self.send_error(404, "nope")
            return
        body = cls.payload
        if mode == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def http_server(corpus_path):
    """A local HTTP server on 127.0.0.1 serving the corpus at /input.txt; yields (url, handler)."""
    handler = type("Handler", (FaultyHandler,), {"payload": corpus_path.read_bytes(), "plan": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/input.txt", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server (SQLite) on a free 127.0.0.1 port, for the whole session."""
    from server import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def hub_export(tmp_path_factory, corpus_path, corpus_sha, prefect_harness) -> dict:
    """A tiny model trained once per session through `shakespeare-gpt export`, with a
    context of 128 characters (so that 100 generated ones fit GPT-2's positions).

    Yields {"artifacts", "out" (the export folder), "run" (the run that trained it),
    "manifest" (that run's manifest), "args" (the CLI options that reach the same model)}.
    """
    import json

    from flows.cli import main

    root = tmp_path_factory.mktemp("hub")
    args = [
        "--preset", "tiny", "--set", "model.block_size=128", "--artifacts", str(root / "a"),
        "--source", str(corpus_path), "--sha256", corpus_sha,
    ]  # fmt: skip
    assert main(["export", *args, "--out", str(root / "hf")]) == 0
    (run,) = [p for p in (root / "a" / "runs").iterdir()]
    manifest = json.loads((run / "manifest.json").read_text())
    return {
        "artifacts": root / "a",
        "out": root / "hf",
        "run": run.name,
        "manifest": manifest,
        "args": args,
    }


@pytest.fixture(autouse=True)
def prefect_console_on_this_tests_stderr():
    """Prefect's console handlers keep the stream that was sys.stderr when its logging was
    set up (the CLI's `main` sets it up): under pytest, an earlier test's capture, closed
    by now, so a later test's log line recursed in logging's error handler. Each test's
    handlers write to that test's stderr."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [
        logging.getLogger(),
        *map(logging.getLogger, list(logging.root.manager.loggerDict)),
    ]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.console.file = sys.stderr
                if hasattr(handler, "stream"):
                    handler.stream = sys.stderr
    yield
