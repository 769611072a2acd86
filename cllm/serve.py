"""An OpenAI-compatible HTTP server over any registered decoding method (`cllm serve`), on Starlette + uvicorn.

Endpoints: `GET /v1/models`, `POST /v1/completions` (the prompt as plain text), `POST /v1/chat/completions` (the
chat template applied as `cllm decode` does), `GET /health`, `GET /metrics` (Prometheus text format).

One worker thread owns the model. With `ar`, `jacobi` or `gated` and `--max-batch` above 1 it runs continuous
batching (`cllm.decoding.continuous`): a request that arrives while others decode is prefilled and joins the
running batch at the next forward, and leaves it when done; every request's greedy output is the one it gets
alone. Other methods (and `--max-batch 1`) decode one request at a time, in arrival order. Requests wait in a
bounded queue (`--max-queue`: a full queue answers 503 with Retry-After).

The OpenAI contract at the edges, as vLLM's server keeps it where the API is silent: errors are OpenAI error
objects (400 bad request, 401 without the `--api-key`, 413 body over `--max-body-bytes`, 503 queue full, 500 a
failed decode; a stream that fails ends with an error event, then `[DONE]`); stop strings are held back while
streaming until they can no longer match, so streamed text equals plain text; a client that hangs up stops its
decode at the next forward, streamed or not; `max_tokens` must be an integer from 1 to `--max-tokens-limit`.
Tokenization runs off the event loop. Parameters a method cannot honour are refused with 400, never ignored.
Responses carry `usage` and, in the extra field `cllm`, the method, forwards and tokens per forward; each request
is logged in one line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from cllm.errors import CllmError

# The decoders (and torch) load with the first Engine, not with this module: `cllm serve --help` stays light.

log = logging.getLogger("cllm.serve")

# Request fields this server cannot honour: refused when set to anything but their neutral value.
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None,
               "tool_choice": None, "functions": None, "response_format": None}


@dataclass
class Limits:
    """What the server admits (the `cllm serve` flags of the same names)."""

    max_batch: int = 8  # rows decoded together (continuous batching); 1: one request at a time
    max_queue: int = 64  # requests waiting beyond the running ones; more get 503
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20  # request bodies over this get 413
    api_key: str | None = None  # if set, /v1 requests need "Authorization: Bearer <key>"

    def validate(self) -> None:
        for name in ("max_batch", "max_queue", "max_tokens_limit", "max_body_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise CllmError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


class RequestError(Exception):
    """A bad request: an HTTP error (400 unless `status` says otherwise) with the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """Raised inside a one-at-a-time decode whose client went away, or that met a stop string."""


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _number(body: dict, key: str):
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RequestError(f"{key} must be a number, got {value!r}", key)
    return value


class TextStream:
    """Committed tokens -> text, with stop strings cut. `add` returns the new text that is safe to send: a tail
    that may still grow into a stop string (or an unfinished UTF-8 character) is held back, so the streamed
    pieces always add up to the final text."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, new: list[int]) -> str:
        self.tokens.extend(new)
        text = self.tok.decode(self.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text
        return self._send(len(text) if self.stopped else len(text) - self._held(text))

    def finish(self) -> str:
        return self._send(len(self.text))

    def _held(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))  # bytes of a character still being spelled out
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def _send(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


@dataclass
class Job:
    """One request on its way through the worker. `emit(delta)` and `finish(result | exception)` are called from
    the worker thread."""

    ids: list[int]
    cfg: registry.DecodeConfig
    seed: int
    text: TextStream
    emit: object = None
    finish: object = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    def on_tokens(self, new: list[int]) -> bool:
        """Returns True when a stop string ended the text."""
        delta = self.text.add(new)
        if self.t_first is None and new:
            self.t_first = time.perf_counter()
        if delta and self.emit is not None:
            self.emit(delta)
        return self.text.stopped


class Metrics:
    """Prometheus metrics of one engine (its own registry, so several engines in one process do not collide)."""

    def __init__(self, engine: "Engine"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.recent: collections.deque = collections.deque()  # (time, tokens) of the last RATE_WINDOW seconds
        Gauge("cllm_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: len(engine._waiting))
        Gauge("cllm_running_rows", "requests being decoded now", registry=r).set_function(lambda: engine.running)
        self.requests = Counter("cllm_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("cllm_generation_tokens", "tokens generated", registry=r)
        self.forwards = Counter("cllm_forwards", "forward passes of the model (a batched forward counts once)",
                                registry=r)
        Gauge("cllm_tokens_per_second", f"tokens generated per second over the last {self.RATE_WINDOW} s",
              registry=r).set_function(self.rate)
        Gauge("cllm_tokens_per_forward", "tokens generated per forward pass since start", registry=r).set_function(
            lambda: self._value(self.tokens) / max(1.0, self._value(self.forwards)))
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
        self.latency = Histogram("cllm_request_latency_seconds", "request latency, arrival to last token",
                                 buckets=buckets, registry=r)
        self.ttft = Histogram("cllm_time_to_first_token_seconds", "arrival to first token", buckets=buckets,
                              registry=r)

    RATE_WINDOW = 10.0

    @staticmethod
    def _value(counter) -> float:
        return counter._value.get()

    def add_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        self.recent.append((time.monotonic(), n))

    def rate(self) -> float:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - self.RATE_WINDOW:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / self.RATE_WINDOW

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Engine:
    """One model and one method. `submit(job)` queues a request for the worker thread (continuous batching for
    ar/jacobi, else one at a time); `generate` decodes one request in the caller's thread (`cllm chat`)."""

    def __init__(self, model, tokenizer, method: str, cfg: registry.DecodeConfig, draft=None,
                 model_id: str = "cllm", limits: Limits | None = None):
        from cllm.decoding import registry

        registry.get(method)
        self.model, self.tok, self.method, self.cfg, self.draft, self.model_id = (
            model, tokenizer, method, cfg, draft, model_id)
        self.limits = limits or Limits()
        self.limits.validate()
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.stats = {"requests": 0, "cancelled": 0, "failed": 0}
        self.lock = threading.Lock()  # one model, one decode at a time outside the batch
        self.metrics = Metrics(self)
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._batch = None
        self._jobs: dict[int, Job] = {}  # id(row) -> its job
        self._worker: threading.Thread | None = None
        self.running = 0

    @property
    def batching(self) -> bool:
        from cllm.decoding.continuous import METHODS

        return self.method in METHODS and self.limits.max_batch > 1

    def settings(self, body: dict, n_prompt: int) -> tuple[registry.DecodeConfig, int, list[str]]:
        """(decode config, seed, stop strings) of a request, or RequestError."""
        from cllm.decoding import registry

        for key, neutral in UNSUPPORTED.items():
            value = body.get(key)
            if value is not None and value is not False and value != neutral:
                raise RequestError(f"'{key}' is not supported by this server", key)
        max_tokens = self._max_tokens(body)
        if self.context and n_prompt + max_tokens > self.context:
            raise RequestError(f"{n_prompt} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
                               f"{self.context}", "max_tokens")
        temperature, top_p = _number(body, "temperature"), _number(body, "top_p")
        if temperature is not None and temperature > 0 and not registry.get(self.method).sampling:
            raise RequestError(f"method {self.method} is greedy only: temperature must be 0 or unset", "temperature")
        given = {"temperature": temperature, "top_p": top_p} if registry.get(self.method).sampling else {}
        cfg = self.cfg.replace(max_new_tokens=max_tokens, **{k: float(v) for k, v in given.items() if v is not None})
        try:
            cfg.validate([self.method])
        except CllmError as e:
            raise RequestError(str(e)) from None
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop must be a string or a list of at most 4 non-empty strings", "stop")
        seed = body.get("seed")
        if seed is not None and type(seed) is not int:
            raise RequestError("seed must be an integer", "seed")
        return cfg, seed or 0, stop

    def _max_tokens(self, body: dict) -> int:
        key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        value = body.get(key)
        if value is None:
            return min(self.cfg.max_new_tokens, self.limits.max_tokens_limit)
        if type(value) is not int or value < 1:  # bool is not an integer here; 0 is not "the default"
            raise RequestError(f"{key} must be a positive integer, got {value!r}", key)
        if value > self.limits.max_tokens_limit:
            raise RequestError(f"{key} {value} is over this server's limit of {self.limits.max_tokens_limit}", key)
        return value

    # ------------------------------------------------------------------------------------------------ the worker

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull
            self._waiting.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="cllm-serve-worker", daemon=True)
                self._worker.start()
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not (self._batch and self._batch.rows):
                    self._cond.wait()
                room = self.limits.max_batch - (len(self._batch.rows) if self._batch else 0) if self.batching else 1
                taken = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            live = []
            for job in taken:
                (self._end(job, "cancelled") if job.cancelled.is_set() else live.append(job))
            if self.batching:
                self._batch_step(live)
            elif live:
                self._run_one(live[0])

    def _batch_step(self, joining: list[Job]) -> None:
        from cllm.decoding.common import eos_ids
        from cllm.decoding.continuous import ContinuousBatch, Row
        from cllm.decoding.gated import resolve_options

        if self._batch is None:
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            self._batch = ContinuousBatch(self.model, eos_ids(self.model, self.tok), pad)
        rows = []
        for job in joining:
            opts = job.cfg.options_for(self.method)
            if self.method == "gated":
                opts = {"options": resolve_options(self.model, opts)}
            else:
                opts = dataclasses.asdict(opts)  # ar: sampling; jacobi: block size, init
                opts.pop("record_trajectory", None)
            row = Row(method=self.method, prompt=job.ids, max_new_tokens=job.cfg.max_new_tokens,
                      on_commit=job.on_tokens, seed=job.seed, **opts)
            self._jobs[id(row)] = job
            rows.append(row)
        for row in self._batch.rows:
            row.cancelled = self._jobs[id(row)].cancelled.is_set()
        self.running = len(self._batch.rows) + len(rows)
        before = self._batch.forwards
        try:
            done = self._batch.step(rows)
        except Exception as e:  # noqa: BLE001 (every request in the batch gets the error, the server goes on)
            log.exception("decode failed")
            done = [r for r in self._batch.fail_all() + rows]
            for row in done:
                row.finish_reason, row.error = "error", e
        self.metrics.forwards.inc(self._batch.forwards - before)
        for row in done:
            job = self._jobs.pop(id(row), None)
            if job is not None:
                self._end(job, row.finish_reason, row.n_forwards, getattr(row, "error", None))
        self.running = len(self._batch.rows)

    def _run_one(self, job: Job) -> None:
        from cllm.decoding import registry

        self.running = 1
        forwards, reason, error = 0, None, None
        commits = [0]

        def on_commit(row: int, new: list[int]) -> None:
            commits[0] += 1
            if job.on_tokens(new) or job.cancelled.is_set():
                raise Cancelled

        with self.lock:
            try:
                [res] = registry.decode(self.method, self.model, self.tok, [job.ids], [job.seed], job.cfg,
                                        self.draft, on_commit=on_commit)
                forwards, reason = res.n_forwards, res.finish_reason
            except Cancelled:
                forwards, reason = commits[0], "stop" if job.text.stopped else "cancelled"
            except Exception as e:  # noqa: BLE001 (the request gets the error, the server goes on)
                log.exception("decode failed")
                forwards, reason, error = commits[0], "error", e
        self.metrics.forwards.inc(forwards)
        self.running = 0
        self._end(job, reason, forwards, error)

    def _end(self, job: Job, reason: str, forwards: int = 0, error: Exception | None = None) -> None:
        """Hand a finished job its result (or its error) and count it."""
        self.stats["requests"] += 1
        if reason in ("cancelled", "error"):
            self.stats["cancelled" if reason == "cancelled" else "failed"] += 1
            self.metrics.requests.labels(reason).inc()
            job.finish(Cancelled() if reason == "cancelled" else error)
            return
        tail = job.text.finish()
        if tail and job.emit is not None:
            job.emit(tail)
        n = len(job.text.tokens)
        out = {"text": job.text.text, "completion_tokens": n, "prompt_tokens": len(job.ids),
               "finish_reason": "length" if reason == "length" else "stop",
               "cllm": {"method": self.method, "forwards": forwards,
                        "tokens_per_forward": round(n / forwards, 4) if forwards else None}}
        latency = time.perf_counter() - job.t0
        self.metrics.requests.labels("ok").inc()
        self.metrics.add_tokens(n)
        self.metrics.latency.observe(latency)
        if job.t_first is not None:
            self.metrics.ttft.observe(job.t_first - job.t0)
        job.finish(out)

    def generate(self, prompt_ids: list[int], cfg, seed: int, stop: list[str], on_text=None) -> dict:
        """Decode one request in this thread (one at a time, whatever the method); returns what a response holds."""
        got = {}
        job = Job(prompt_ids, cfg, seed, TextStream(self.tok, stop), emit=on_text,
                  finish=lambda out: got.update(out=out))
        self._run_one(job)
        if isinstance(got["out"], Exception):
            raise got["out"]
        return got["out"]


def chat_prompt_ids(tokenizer, body: dict) -> list[int]:
    from cllm.data.prompts import format_chat

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                          "assistant")
            for m in messages):
        raise RequestError("messages must be a non-empty list of {role, content} with text content", "messages")
    return format_chat(tokenizer, messages)


def completion_prompt_ids(tokenizer, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be one non-empty string", "prompt")
    return list(tokenizer(prompt)["input_ids"])


async def _read_json(request, limit: int) -> dict:
    """The request body as a JSON object: 413 over `limit` bytes, 400 if not UTF-8, not JSON (too deeply nested
    included) or not an object."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(f"the request body is over {limit} bytes", status=413)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise RequestError(f"the request body is over {limit} bytes", status=413)
    try:
        body = json.loads(bytes(data).decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise RequestError(f"the request body is not JSON: {getattr(e, 'msg', 'nested too deeply')}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _authorized(request, key: str | None) -> bool:
    if not key:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


def _error(status: int, message: str, param=None, kind="invalid_request_error", headers=None):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(message, param, kind), status_code=status, headers=headers)


def _unauthorized():
    return _error(401, "a valid API key is required (Authorization: Bearer KEY)", kind="authentication_error")


def build_app(engine: Engine):
    """The Starlette application serving `engine`."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def models(request):
        if not _authorized(request, engine.limits.api_key):
            return _unauthorized()
        return JSONResponse({"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                                          "created": 0, "owned_by": "cllm"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "method": engine.method, "batching": engine.batching,
                             "running": engine.running, "waiting": len(engine._waiting), **engine.stats})

    async def metrics(request):
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics),
              Route("/v1/completions", _endpoint(engine, False), methods=["POST"]),
              Route("/v1/chat/completions", _endpoint(engine, True), methods=["POST"])]
    return Starlette(routes=routes)


def _endpoint(engine: Engine, chat: bool):
    """The handler of /v1/chat/completions (chat) or /v1/completions."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response, StreamingResponse

    async def handle(request):
        t0 = time.perf_counter()
        if not _authorized(request, engine.limits.api_key):
            return _unauthorized()
        try:
            body = await _read_json(request, engine.limits.max_body_bytes)
            # tokenizing a long prompt takes a while: not on the event loop, which serves every client
            ids = await run_in_threadpool(chat_prompt_ids if chat else completion_prompt_ids, engine.tok, body)
            cfg, seed, stop = engine.settings(body, len(ids))
        except RequestError as e:
            return _error(e.status, str(e), e.param, e.kind)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": engine.model_id}
        loop = asyncio.get_running_loop()
        future, pieces = loop.create_future(), asyncio.Queue()

        def finish(out):
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(out))

        job = Job(ids, cfg, seed, TextStream(engine.tok, stop), finish=finish, t0=t0,
                  emit=(lambda d: loop.call_soon_threadsafe(pieces.put_nowait, d)) if body.get("stream") else None)
        try:
            engine.submit(job)
        except QueueFull:
            return _error(503, f"the server is at capacity ({engine.limits.max_queue} requests waiting); retry "
                          "later", kind="server_error", headers={"Retry-After": "1"})
        if body.get("stream"):
            return StreamingResponse(_stream(job, future, pieces, chat, meta), media_type="text/event-stream")
        out = await _wait(request, job, future)
        _log(chat, ids, out, t0, job)
        if isinstance(out, Cancelled):
            return Response(status_code=499)  # the client is gone: nobody reads this
        if isinstance(out, Exception):
            return _error(500, f"the decode failed: {type(out).__name__}: {out}", kind="server_error")
        return JSONResponse(_final(out, chat, meta))

    return handle


async def _wait(request, job: Job, future):
    """The job's result; a client that hangs up meanwhile cancels it (its row leaves at the next forward)."""
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(future), 0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()


def _log(chat: bool, ids, out, t0: float, job: Job) -> None:
    kind = "chat" if chat else "completion"
    wall = time.perf_counter() - t0
    if isinstance(out, Exception):
        what = "cancelled" if isinstance(out, Cancelled) else f"failed ({type(out).__name__}: {out})"
        log.info("%s %s after %.2f s, %d prompt tokens", kind, what, wall, len(ids))
        return
    ttft = f"{job.t_first - job.t0:.2f} s" if job.t_first else "-"
    log.info("%s ok %.2f s (first token %s), %d prompt + %d completion tokens, %s tokens/forward, finish %s",
             kind, wall, ttft, out["prompt_tokens"], out["completion_tokens"], out["cllm"]["tokens_per_forward"],
             out["finish_reason"])


def _usage(out: dict) -> dict:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


def _final(out: dict, chat: bool, meta: dict) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": out["text"]}} if chat
              else {"index": 0, "text": out["text"], "logprobs": None})
    choice["finish_reason"] = out["finish_reason"]
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": _usage(out), "cllm": out["cllm"]}


def _chunk(meta: dict, chat: bool, text: str | None, finish: str | None = None, first: bool = False) -> str:
    if chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    obj = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(job: Job, future, pieces, chat: bool, meta: dict):
    """Server-sent events: text as it becomes safe to send, then a last chunk with finish_reason, usage and cllm;
    a failed decode ends with an error event. A client that goes away cancels the job."""
    try:
        if chat:
            yield _chunk(meta, chat, None, first=True)
        while not (future.done() and pieces.empty()):
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait([getter, future], return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _chunk(meta, chat, getter.result())
            else:
                getter.cancel()
        out = future.result()
        _log(chat, job.ids, out, job.t0, job)
        if isinstance(out, Exception):
            body = error_body(f"the decode failed: {type(out).__name__}: {out}", kind="server_error")
            yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
            return
        last = json.loads(_chunk(meta, chat, None, out["finish_reason"])[len("data: "):])
        last.update(usage=_usage(out), cllm=out["cllm"])
        yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op once it finished; else its row leaves at the next forward


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM, then finish the running request and return (the command exits 0). Uvicorn by
    itself re-raises the signal after its graceful shutdown, which ends the process with status -15."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()  # handled by the graceful shutdown: nothing to re-raise

    if not log.handlers:  # one line per request, beside uvicorn's own log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s cllm.serve %(message)s"))
        log.addHandler(handler)
        log.setLevel(log_level.upper())
        log.propagate = False
    config = uvicorn.Config(build_app(engine), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=60)
    _Server(config).run()


def load_engine(*, model: str, adapter: str | None, draft: str | None, method: str, dtype: str, device: str | None,
                cfg, limits: Limits | None = None) -> Engine:
    """Load the model (with its adapter) and the draft, checked against each other, into an `Engine`."""
    from cllm.models import ModelSpec

    spec = ModelSpec(model, adapter, dtype, device, draft)
    spec.check()
    loaded = spec.load()
    log.info("model %s, dtype %s%s, device %s", model, loaded.spec.dtype, " (auto)" if dtype == "auto" else "",
             loaded.spec.device)
    target, tok, draft_model = loaded.model, loaded.tokenizer, loaded.draft
    model_id = str(model).rstrip("/").split("/")[-1] + (f"+{adapter.rstrip('/').split('/')[-1]}" if adapter else "")
    return Engine(target, tok, method, cfg, draft_model, model_id, limits)
