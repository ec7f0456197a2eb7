"""`shakespeare-gpt api` as a real process on 127.0.0.1: the official `openai` client gets the
CLI's sample, concurrent requests all succeed, bad requests get 400s naming the field, a full
queue gets 503, and the playground page streams text in Chromium."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest
from server import free_port
from test_server import BROWSER_ARGS, SCREENSHOTS, chromium

from mlx_model.checkpoint import load_model
from mlx_model.config import GPTConfig, SampleConfig, ServeConfig
from mlx_model.data import Vocab
from mlx_model.generate import generate_text
from mlx_model.model import GPT

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:\n"


@pytest.fixture(scope="session")
def api_server(hub_export, tmp_path_factory):
    """`python -m flows api --model RUN` on a free port; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    cmd = [
        sys.executable, "-m", "flows", "api", "--artifacts", str(hub_export["artifacts"]),
        "--model", hub_export["run"], "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "SHAKESPEARE_GPT_PROGRESS": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ours(hub_export):
    """The project's model and vocabulary, loaded here, for reference texts."""
    train = Path(hub_export["manifest"]["stages"]["train"]["path"])
    return load_model(train / "best"), Vocab.load(train / "vocab.json")


def client(url: str, retries: int = 0):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=retries)


def test_openai_client_gets_the_clis_sample(api_server, hub_export, capsys):
    from flows.cli import main

    settings = {"seed": 11, "max_tokens": 150, "temperature": 0.9, "top_p": 0.95}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    assert main(["sample", *hub_export["args"], "--prompt", PROMPT, *flags]) == 0
    manifest = capsys.readouterr().out.split("manifest: ")[1].splitlines()[0]
    sample = json.loads(Path(manifest).read_text())["stages"]["sample"]["info"]["text"]
    assert sample.startswith(PROMPT) and len(sample) == len(PROMPT) + 150
    expected = sample[len(PROMPT) :]

    api = client(api_server)
    (model,) = [m.id for m in api.models.list()]
    assert model == hub_export["run"]
    done = api.completions.create(model=model, prompt=PROMPT, **settings)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == len(PROMPT) and done.usage.completion_tokens == 150
    stream = api.completions.create(model=model, prompt=PROMPT, stream=True, **settings)
    chunks = [c.choices[0] for c in stream]
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == "length"


def test_stop_strings_end_the_completion(api_server, ours):
    model, vocab = ours
    free = generate_text(model, vocab, SampleConfig(prompt=PROMPT, max_tokens=200, seed=4))
    stop = free[len(PROMPT) + 20 : len(PROMPT) + 22]  # occurs at the latest 20 characters in
    api = client(api_server)
    done = api.completions.create(
        model=api.models.list().data[0].id, prompt=PROMPT, max_tokens=200, seed=4,
        temperature=0.8, stop=["@@@", stop],
    )  # fmt: skip
    cut = free[len(PROMPT) :]
    assert done.choices[0].text == cut[: cut.index(stop)]
    assert done.choices[0].finish_reason == "stop"


def test_eight_concurrent_requests_all_succeed(api_server, ours):
    model, vocab = ours
    api = client(api_server)  # no retries: a 503 would fail the test
    model_id = api.models.list().data[0].id

    def ask(seed: int) -> str:
        return (
            api.completions.create(
                model=model_id, prompt=PROMPT, max_tokens=64, seed=seed, temperature=1.0
            )
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, range(8)))
    for seed, text in enumerate(texts):  # each request got its own text, none mixed up
        cfg = SampleConfig(prompt=PROMPT, max_tokens=64, seed=seed, temperature=1.0)
        assert PROMPT + text == generate_text(model, vocab, cfg)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "caf\u00e9"}, "prompt", "outside the vocabulary: '\u00e9'"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "A", "max_tokens": 100_000}, "max_tokens", "at most 4096"),
        ({"prompt": "A", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"prompt": "A", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "A", "temperature": -0.5}, "temperature", "greater than or equal to 0"),
        ({"prompt": "A", "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"prompt": "A", "temperature": "hot"}, "temperature", "valid number"),
        ({"prompt": "A", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "A", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "A", "stream": "yes"}, "stream", "valid boolean"),
        ({"prompt": "A", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "A", "n": 3}, "n", "only 1"),
        ({"prompt": "A", "logprobs": 5}, "logprobs", "only 0"),
        ({"prompt": "A", "colour": "red"}, "colour", "not a field"),
        ({"prompt": 7}, "prompt", "valid string"),
        ({}, "prompt", "required"),
    ],
)
def test_bad_requests_get_400_naming_the_field(api_server, body, param, words):
    status, answer = post(api_server, json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"
    assert param in answer["error"]["message"] and words in answer["error"]["message"]


def test_malformed_bodies_get_400_and_the_server_keeps_answering(api_server):
    for body in (b"{not json", b"[1, 2]", b"null"):
        status, answer = post(api_server, body)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    status, answer = post(api_server, json.dumps({"prompt": "A", "model": "gpt-4"}).encode())
    assert status == 404 and answer["error"]["param"] == "model"
    status, answer = post(api_server, json.dumps({"prompt": "A", "max_tokens": 5}).encode())
    assert status == 200 and len(answer["choices"][0]["text"]) == 5


def test_a_full_queue_gets_503_then_serves_again():
    from starlette.testclient import TestClient

    from mlx_model.server import Generator, Worker, create_app

    vocab = Vocab("\n ABab")
    model = GPT(GPTConfig(vocab_size=vocab.size, block_size=8, n_layer=1, n_head=1, n_emb=8))
    mx.eval(model.parameters())  # made here; the worker thread only reads them
    worker = Worker(max_queue=1)
    started, release = threading.Event(), threading.Event()
    worker.submit(lambda: (started.set(), release.wait()))  # occupies the worker
    started.wait()
    worker.submit(lambda: None)  # the one place in the queue
    app = create_app(Generator(model, vocab, worker), "m", SampleConfig(), ServeConfig())
    with TestClient(app) as http:
        busy = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "server_busy"
        release.set()  # the worker then takes the queued job, which frees the place
        deadline = time.monotonic() + 30
        while True:
            ok = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3})
            if ok.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 3
    worker.close()


def test_the_servers_defaults_fill_what_a_request_leaves_out():
    from starlette.testclient import TestClient

    from mlx_model.server import Generator, Worker, create_app

    vocab = Vocab("\n ABab")
    model = GPT(GPTConfig(vocab_size=vocab.size, block_size=8, n_layer=1, n_head=1, n_emb=8))
    mx.eval(model.parameters())
    greedy = SampleConfig(prompt="ab", max_tokens=12, temperature=0.0)
    text = generate_text(model, vocab, greedy)[2:]
    worker = Worker(max_queue=2)
    for stop in (None, text[5:7]):
        defaults = greedy.replace(prompt="\n", stop=stop)
        app = create_app(Generator(model, vocab, worker), "m", defaults, ServeConfig())
        with TestClient(app) as http:
            done = http.post("/v1/completions", json={"prompt": "ab"}).json()["choices"][0]
        assert done["text"] == (text[: text.index(stop)] if stop else text)
        assert done["finish_reason"] == ("stop" if stop else "length")
    worker.close()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--port", "70000"], "ServeConfig.port must be at most 65535"),
        (["--max-queue", "0"], "ServeConfig.max_queue must be a positive integer"),
        (["--max-request-bytes", "0"], "ServeConfig.max_request_bytes must be a positive integer"),
        (["--model", "no-such-run"], "no run named 'no-such-run'"),
        (["--max-tokens", "5000"], "max_tokens 5000 is over max_tokens_limit 4096"),
    ],
)
def test_api_command_refuses_bad_settings_in_one_line(tmp_path, flags, words, capsys):
    from flows.cli import main

    assert main(["api", "--artifacts", str(tmp_path), "--model", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1


def test_api_command_refuses_a_port_in_use(tmp_path, capsys):
    from flows.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert main(["api", "--artifacts", str(tmp_path), "--model", "x", "--port", port]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.slow
def test_playground_streams_text_in_chromium(api_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        page = browser.new_page()
        page.goto(api_server)
        page.wait_for_function("document.getElementById('model').textContent !== '…'")
        # record the completion's lengths as the page shows them: streamed text passes
        # through partial lengths, a single block would not
        page.evaluate(
            """() => { window.lengths = new Set();
              new MutationObserver(() => {
                const c = document.getElementById('completion');
                if (c) window.lengths.add(c.textContent.length);
              }).observe(document.getElementById('out'),
                         {childList: true, characterData: true, subtree: true}); }"""
        )
        page.fill("#prompt", PROMPT)
        page.fill("#max_tokens", "2000")
        page.fill("#seed", "5")
        page.click("#generate")
        page.wait_for_function(
            "document.getElementById('status').textContent.includes('characters in')",
            timeout=60_000,
        )
        text = page.inner_text("#completion")
        partial = page.evaluate("[...window.lengths].filter(n => n > 0 && n < 2000)")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=True)
        browser.close()
    assert len(text) == 2000 and partial, (len(text), partial)


def test_unknown_routes_and_nested_fields_get_openais_error_body():
    """A newcomer's curl of /v1/chat/completions got FastAPI's {"detail": ...}; an unknown
    key inside stream_options was blamed on stream_options itself."""
    from starlette.testclient import TestClient

    from mlx_model.server import Generator, Worker, create_app

    vocab = Vocab("\n ABab")
    model = GPT(GPTConfig(vocab_size=vocab.size, block_size=8, n_layer=1, n_head=1, n_emb=8))
    mx.eval(model.parameters())
    worker = Worker(max_queue=2)
    app = create_app(Generator(model, vocab, worker), "m", SampleConfig(), ServeConfig())
    with TestClient(app) as http:
        missing = http.post("/v1/chat/completions", json={"messages": []})
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "POST /v1/chat/completions: Not Found"
        wrong = http.get("/v1/completions")
        assert wrong.status_code == 405 and "Method Not Allowed" in wrong.json()["error"]["message"]
        body = {"prompt": "ab", "max_tokens": 2, "stream": True, "stream_options": {"foo": 1}}
        nested = http.post("/v1/completions", json=body)
        assert nested.status_code == 400
        assert nested.json()["error"]["message"].startswith("stream_options.foo: not a field")
        as_text = http.post(
            "/v1/completions", content=b'{"prompt": "ab"}', headers={"content-type": "text/plain"}
        )
        assert (
            as_text.status_code == 400 and "application/json" in as_text.json()["error"]["message"]
        )
    worker.close()


def test_a_body_over_the_limit_gets_413_and_the_server_keeps_answering():
    """Declared or chunked, a body over --max-request-bytes is refused before the server
    holds it whole (none was before: a 1 GB prompt was read and encoded)."""
    from starlette.testclient import TestClient

    from mlx_model.server import Generator, Worker, create_app

    vocab = Vocab("\n ABab")
    model = GPT(GPTConfig(vocab_size=vocab.size, block_size=8, n_layer=1, n_head=1, n_emb=8))
    mx.eval(model.parameters())
    worker = Worker(max_queue=2)
    serve = ServeConfig(max_request_bytes=200)
    app = create_app(Generator(model, vocab, worker), "m", SampleConfig(), serve)
    big = json.dumps({"prompt": "ab" * 200, "max_tokens": 2}).encode()
    with TestClient(app) as http:
        declared = http.post("/v1/completions", content=big)
        assert declared.status_code == 413
        error = declared.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert f"is {len(big)} bytes" in error["message"] and "at most 200" in error["message"]

        def chunks():
            for i in range(0, len(big), 50):
                yield big[i : i + 50]

        chunked = http.post("/v1/completions", content=chunks())  # no Content-Length
        assert (
            chunked.status_code == 413 and "passed 200 bytes" in chunked.json()["error"]["message"]
        )
        ok = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2})
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 2
        streamed = http.post(
            "/v1/completions", json={"prompt": "ab", "max_tokens": 3, "stream": True}
        )
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("[DONE]")
    worker.close()
