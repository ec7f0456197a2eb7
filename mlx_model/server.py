"""An OpenAI-compatible HTTP server for a trained model: `/v1/completions`, `/v1/models`,
and a playground page at `/`.

The protocol is OpenAI's legacy completions API (the one mlx-lm's server and most
OpenAI-API clients speak): a JSON request, a `text_completion` object back, or with
`"stream": true` the same object in pieces as server-sent events ending with
`data: [DONE]`. Generation is this project's KV-cached sampler (`generate.py`), so a
request gives exactly the text `shakespeare-gpt sample` gives for the same prompt,
seed and settings.

MLX runs on one worker thread, one request at a time; up to `max_queue` requests wait
and the next gets 503. A request outside the limits gets 400 with OpenAI's error body,
whose `param` names the field; neither takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .checkpoint import load_model
from .config import SampleConfig, ServeConfig
from .data import Vocab
from .generate import StopStrings, generate_tokens
from .model import GPT

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_SEED = 2**63 - 1  # OpenAI's seed is a 64-bit signed integer
# A stream sends at most one chunk per interval (seconds); what is generated meanwhile goes
# in the next. Smooth to the eye, and it keeps the event loop from taking the worker's
# CPU time one token at a time.
STREAM_INTERVAL = 0.02


class Channel:
    """From the worker thread to one request's event loop: `put` from any thread, `batch`
    awaited on the loop. The loop is woken only when it waits for a batch, not per item."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._lock, self._ready = loop, threading.Lock(), asyncio.Event()
        self._items: list[Any] = []
        self._woken = False

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self._loop.call_soon_threadsafe(self._ready.set)

    async def batch(self) -> list[Any]:
        """Everything put since the last batch (at least one item)."""
        await self._ready.wait()
        with self._lock:
            items, self._items = self._items, []
            self._woken = False
            self._ready.clear()
        return items


class ServerBusy(Exception):
    """The worker's queue is full."""


class Worker:
    """One thread that runs every MLX call, one job at a time, in the order submitted.

    MLX must not be used from two threads at once; a single worker also keeps one
    request's tokens coming at full speed instead of several at a fraction. At most
    `max_queue` jobs wait behind the running one; `submit` raises ServerBusy beyond that.
    """

    def __init__(self, max_queue: int):
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="mlx-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job` (which must not raise); raises ServerBusy when the queue is full."""
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ServerBusy from None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the worker and return its result (blocking; for setup)."""
        done: Future = Future()

        def job() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as err:  # handed to the caller, who re-raises it
                done.set_exception(err)

        self._jobs.put(job)
        return done.result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


class BadRequest(Exception):
    """A request outside the limits: 400 (or `status`) with OpenAI's error body."""

    def __init__(self, param: str | None, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.message, self.status, self.code = param, message, status, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: a request whose body is over `limit` bytes gets 413, in OpenAI's
    error body, before the application sees it: at once when its Content-Length says so,
    else (a chunked body) as soon as the bytes received pass the limit. The body is read
    here and handed on whole, so the limit also bounds what a request holds in memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, f"is {int(length)} bytes")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send, f"passed {self.limit} bytes")
        handed = False

        async def replay():
            nonlocal handed
            if handed:  # later reads: a client leaving a streamed response
                return await receive()
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: str) -> None:
        message = (
            f"the request body {size}; this server takes at most {self.limit} (--max-request-bytes)"
        )
        payload = json.dumps(error_body(message, "invalid_request_error")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields (types strict: "5" is not 5),
    plus `top_k` as mlx-lm has it. Fields OpenAI has and this server does not implement
    are accepted only at their neutral value; any other field is refused."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    n: Literal[1] = 1
    best_of: Literal[1] | None = None
    logprobs: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    suffix: None = None
    user: str | None = None


@dataclass
class Job:
    """One completion as the worker runs it; `emit` hands each event to the request's
    event loop: a str (text), or ("done", finish_reason, completion_tokens), or
    ("error", message)."""

    prompt_ids: np.ndarray
    sampling: SampleConfig
    stops: list[str]
    emit: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Generator:
    """The model, its vocabulary and the worker that runs it. The model's parameters must
    be evaluated (as `load_model` leaves them): an MLX graph built on one thread cannot
    be run on another."""

    def __init__(self, model: GPT, vocab: Vocab, worker: Worker):
        self.model, self.vocab, self.worker = model, vocab, worker

    def run(self, job: Job) -> None:
        """Generate on the worker thread; never raises (a failure becomes an event)."""
        if job.cancelled.is_set():  # the client left while the request waited
            return
        try:
            stops = StopStrings(job.stops)
            cfg = job.sampling
            tokens = generate_tokens(
                self.model, job.prompt_ids, cfg.max_tokens, cfg.temperature,
                cfg.top_k, cfg.top_p, cfg.seed,
            )  # fmt: skip
            count = 0
            for tok in tokens:
                count += 1
                if text := stops.feed(self.vocab.decode(tok)):
                    job.emit(text)
                if stops.hit or job.cancelled.is_set():
                    break
            if rest := stops.flush():
                job.emit(rest)
            job.emit(("done", "stop" if stops.hit else "length", count))
        except Exception as err:  # reported to the client; the worker keeps serving
            job.emit(("error", f"{type(err).__name__}: {err}"))


def sampling_for(req: CompletionRequest, defaults: SampleConfig, limit: int) -> SampleConfig:
    """The request's settings over the server's defaults; raises BadRequest naming the field."""
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest("prompt", f"one prompt per request, got a list of {len(prompt)}")
        prompt = prompt[0]
    if not prompt:
        raise BadRequest("prompt", "prompt must not be empty (a character model needs one)")
    max_tokens = req.max_tokens if req.max_tokens is not None else defaults.max_tokens
    if max_tokens > limit:
        raise BadRequest(
            "max_tokens",
            f"max_tokens must be at most {limit} (this server's limit), got {max_tokens}",
        )
    given = {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
    }  # fmt: skip
    return defaults.replace(
        prompt=prompt,
        max_tokens=max_tokens,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
        stop=None,
        **{k: v for k, v in given.items() if v is not None},
    )


def stop_strings(stop: str | list[str] | None, default: str | None = None) -> list[str]:
    """The request's stop strings, or the server's default when it gives none."""
    if stop is None:
        return [default] if default else []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise BadRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise BadRequest("stop", "a stop string must not be empty")
    return stops


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a malformed body, as OpenAI's 400 naming the first bad field."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    if err.get("type") == "json_invalid":
        param, message = None, f"the request body is not valid JSON: {err.get('msg')}"
    elif not loc:
        param, message = (
            None,
            ("the request body must be a JSON object, sent as Content-Type: application/json"),
        )
    else:
        param = loc[0]
        where = param + "".join(f"[{p}]" for p in loc[1:] if p.isdigit())
        message = f"{where}: {err.get('msg')}"
        if err.get("type") == "extra_forbidden":
            field = ".".join(p for p in loc if not p.isdigit())  # stream_options.foo
            message = f"{field}: not a field of this API (unknown or unsupported)"
        elif err.get("type") == "literal_error":
            message = f"{param}: only {err.get('ctx', {}).get('expected')} is supported here"
        elif "input" in err and err["type"] != "missing":
            message += f", got {json.dumps(err['input'], default=str)[:80]}"
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)


def create_app(generator: Generator, model_id: str, defaults: SampleConfig, serve: ServeConfig):
    """The FastAPI application. `defaults` fill what a request leaves out (its seed
    excepted: none given draws a fresh one, as OpenAI does)."""
    app = FastAPI(title="shakespeare-gpt", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=serve.max_request_bytes)
    created = int(time.time())
    playground = resources.files(__package__).joinpath("playground.html").read_text()

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """404 and 405 in OpenAI's error body too (`/v1/chat/completions` is not served)."""
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = error_body(message, "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        kind = "invalid_request_error"
        return JSONResponse(error_body(exc.message, kind, exc.param, exc.code), exc.status)

    @app.exception_handler(ServerBusy)
    async def busy(_: Request, exc: ServerBusy) -> JSONResponse:
        message = f"the server is busy ({serve.max_queue} requests waiting); retry later"
        body = error_body(message, "server_busy")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(GenerationFailed)
    async def failed(_: Request, exc: GenerationFailed) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error"), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return playground

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "local"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.model is not None and req.model != model_id:
            raise BadRequest(
                "model", f"model {req.model!r} is not served here; this server serves "
                f"{model_id!r} (GET /v1/models)", 404, "model_not_found",
            )  # fmt: skip
        cfg = sampling_for(req, defaults, serve.max_tokens_limit)
        stops = stop_strings(req.stop, defaults.stop)
        try:
            prompt_ids = generator.vocab.encode(cfg.prompt)
        except ValueError as err:
            raise BadRequest("prompt", str(err).replace("text has", "prompt has", 1)) from None
        events = Channel(asyncio.get_running_loop())
        job = Job(prompt_ids, cfg, stops, events.put)
        generator.worker.submit(lambda: generator.run(job))  # ServerBusy: 503
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model_id,
        }  # fmt: skip
        echo = cfg.prompt if req.echo else ""
        usage = {"prompt_tokens": len(prompt_ids)}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _stream(events, job, head, echo, usage, include_usage)
            return StreamingResponse(body, media_type="text/event-stream")
        try:
            pieces, (finish, count) = await _collect(events)
        finally:
            job.cancelled.set()  # the client left, or it finished: either way, stop
        choice = {"index": 0, "text": echo + "".join(pieces), "logprobs": None}
        return {
            **head,
            "choices": [{**choice, "finish_reason": finish}],
            "usage": {**usage, "completion_tokens": count,
                      "total_tokens": usage["prompt_tokens"] + count},
        }  # fmt: skip

    return app


class GenerationFailed(Exception):
    """The worker reported an error while generating."""


async def _events(events: Channel, interval: float = 0.0) -> AsyncIterator[list[Any]]:
    """Batches of what the worker emitted, at most one per `interval` seconds."""
    while True:
        batch = await events.batch()
        yield batch
        if isinstance(batch[-1], tuple):
            return
        if interval:
            await asyncio.sleep(interval)


async def _collect(events: Channel) -> tuple[list[str], tuple[str, int]]:
    pieces: list[str] = []
    async for batch in _events(events):
        pieces += [e for e in batch if isinstance(e, str)]
        last = batch[-1]
        if isinstance(last, tuple):
            if last[0] == "error":
                raise GenerationFailed(last[1])
            return pieces, (last[1], last[2])
    raise AssertionError("the worker ended without a final event")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(events, job: Job, head: dict, echo: str, usage: dict, include_usage: bool):
    """Server-sent events: a `text_completion` chunk with the text generated since the last
    one (at most one per STREAM_INTERVAL), the finish reason, `[DONE]`."""

    def chunk(text: str, finish: str | None) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    try:
        if echo:
            yield chunk(echo, None)
        async for batch in _events(events, STREAM_INTERVAL):
            text = "".join(e for e in batch if isinstance(e, str))
            last = batch[-1]
            if isinstance(last, tuple) and last[0] == "error":
                yield _sse(error_body(last[1], "server_error"))
                break
            if isinstance(last, tuple):
                yield chunk(text, last[1])
                if include_usage:
                    total = {**usage, "completion_tokens": last[2]}
                    total["total_tokens"] = total["prompt_tokens"] + last[2]
                    yield _sse({**head, "choices": [], "usage": total})
                break
            yield chunk(text, None)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that disconnects stops its generation


def load(model_dir: Path, vocab_path: Path, worker: Worker) -> Generator:
    """Load the checkpoint on the worker thread (where every later MLX call runs)."""
    vocab = Vocab.load(vocab_path)
    model = worker.call(load_model, model_dir)
    if model.config.vocab_size != vocab.size:
        raise ValueError(
            f"{vocab_path} has {vocab.size} characters; the model at {model_dir} "
            f"expects {model.config.vocab_size}"
        )
    return Generator(model, vocab, worker)


def serve(
    model_dir: Path,
    vocab_path: Path,
    model_id: str,
    defaults: SampleConfig,
    config: ServeConfig,
    verbose: bool = False,
) -> None:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    config.check(defaults)
    worker = Worker(config.max_queue)
    generator = load(Path(model_dir), Path(vocab_path), worker)
    app = create_app(generator, model_id, defaults, config)
    url = f"http://{config.host}:{config.port}"
    print(f"serving {model_id} at {url}: playground {url}/, OpenAI API {url}/v1", flush=True)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="info" if verbose else "warning",
        access_log=verbose,
    )
