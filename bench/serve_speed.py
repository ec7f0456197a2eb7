"""How fast does `shakespeare-gpt api` stream a model's text, against `shakespeare-gpt sample`?

Starts `shakespeare-gpt api` once, then alternates rounds of the two peers with the same
prompt, seed and settings (a new seed each round):

  sample  `shakespeare-gpt sample --force sample`, which streams the text to its stdout
  api     a streamed POST /v1/completions (server-sent events) to that server

Each side's rate is characters per second from the first generated character it delivers
to the last (`--max-tokens` of them: no stop string, so exactly that many), read as they
arrive; the start-up around each (the Prefect flow around `sample`, the HTTP request, the
prompt's prefill) is outside it. A round's ratio is api / sample; the range over the
rounds is the figure (the machine is shared, so only the ratio within a round counts).

    python bench/serve_speed.py --source PATH/input.txt            # the default model
    python bench/serve_speed.py --preset tiny --rounds 3           # a quick look

The model is the one `shakespeare-gpt sample` uses for the same options (trained first
if it is not cached), and the server is given the run that trained it (`--model RUN`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "flows"]
MARK = b"----- sample -----\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    # the flow's temporary Prefect server can take more than its default 20 s to start on a
    # busy machine
    timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return {
        **os.environ, "SHAKESPEARE_GPT_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": timeout,
    }  # fmt: skip


def sample_rate(common: list[str], prompt: str, seed: int, n: int, settings: list[str]) -> float:
    """Characters per second of `shakespeare-gpt sample`'s streamed text, first to n-th."""
    cmd = [*CLI, "sample", *common, "--force", "sample", "--prompt", prompt,
           "--seed", str(seed), "--max-tokens", str(n), *settings]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE)
    head = MARK + prompt.encode()
    seen, buffer, first, last = 0, b"", None, None
    while seen < n:
        data = os.read(proc.stdout.fileno(), 65536)
        now = time.perf_counter()
        if not data:
            raise RuntimeError(f"sample ended after {seen} of {n} characters")
        if first is None:
            buffer += data
            if head not in buffer:
                continue
            data = buffer.split(head, 1)[1]
            if not data:
                continue
            first = now
        seen += len(data.decode("utf-8", "ignore"))
        last = now
    proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return (n - 1) / (last - first)


def api_rate(port: int, body: dict) -> float:
    """Characters per second of a streamed completion, first to last character."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    seen, first, last = 0, None, None
    while line := response.readline():
        now = time.perf_counter()
        if not line.startswith(b"data: {"):
            continue
        text = json.loads(line[6:])["choices"][0]["text"]
        if text:
            first = first or now
            last = now
            seen += len(text)
    conn.close()
    if seen != body["max_tokens"]:
        raise RuntimeError(f"the server streamed {seen} of {body['max_tokens']} characters")
    return (seen - 1) / (last - first)


def trained_run(common: list[str]) -> str:
    """The run whose model `sample` uses for these options (trains it if needed)."""
    out = subprocess.run([*CLI, "stage", "train", *common], cwd=ROOT, env=env(),
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(Path(out.stdout.split("manifest: ")[1].splitlines()[0]).read_text())["run"]


def start_api(common: list[str], run: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [*CLI, "api", *common, "--model", run, "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not answer in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default=None, help="model preset (default: the CLI's default)")
    parser.add_argument("--artifacts", default=None, help="artifact root (default: the CLI's)")
    parser.add_argument("--source", default=None, help="corpus URL or path (default: the CLI's)")
    parser.add_argument("--max-tokens", type=int, default=2000, help="characters per request")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument(
        "--settle", type=float, default=3.0,
        help="seconds to wait before each measurement (a finished `sample` process's "
        "temporary Prefect server shuts down in the background)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the rounds to this file")
    args = parser.parse_args()
    if args.rounds < 1 or args.max_tokens < 2:
        parser.error("--rounds must be at least 1 and --max-tokens at least 2")

    common = [f"--{k}={v}" for k in ("preset", "artifacts", "source") if (v := getattr(args, k))]
    settings = ["--temperature", str(args.temperature)]
    run = trained_run(common)
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_speed-{port}.log"
    server = start_api(common, run, port, log)
    rounds = []
    try:
        for i in range(args.rounds):
            body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "seed": i,
                    "temperature": args.temperature, "stream": True}  # fmt: skip

            # alternate which goes first, so neither always runs on a warmer machine
            def api(body: dict = body) -> float:
                time.sleep(args.settle)
                return api_rate(port, body)

            def cli(seed: int = i) -> float:
                time.sleep(args.settle)
                return sample_rate(common, args.prompt, seed, args.max_tokens, settings)

            if i % 2:
                a, s = api(), cli()
            else:
                s, a = cli(), api()
            rounds.append({"round": i, "sample_chars_per_s": s, "api_chars_per_s": a,
                           "ratio": a / s})  # fmt: skip
            print(f"round {i}: sample {s:8.0f} chars/s   api {a:8.0f} chars/s   ratio {a / s:.3f}",
                  flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    ratios = sorted(r["ratio"] for r in rounds)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor() or platform.machine(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor() or platform.machine()  # fmt: skip
    print(
        f"api / sample: {ratios[0]:.3f} to {ratios[-1]:.3f} (median "
        f"{ratios[len(ratios) // 2]:.3f}) over {len(ratios)} rounds "
        f"(model run {run}, {args.max_tokens} characters, {os.cpu_count()} cores, {cpu})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"run": run, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
