"""An OpenAI-compatible HTTP server over any registered decoding method (`cllm serve`), on Starlette + uvicorn.

Endpoints: `GET /v1/models`, `POST /v1/completions` (the prompt as plain text), `POST /v1/chat/completions` (the
chat template applied as `cllm decode` does), `GET /health`. Streaming sends server-sent events as tokens are
committed (a Jacobi iteration that commits 3 tokens sends them in one event); methods that do not stream send their
text when done. Requests queue: one decode at a time. A client that disconnects mid-stream stops its decode at the
next committed token. Parameters a method cannot honour are refused with HTTP 400 in the OpenAI error shape, never
ignored. Responses carry `usage` and, in the extra field `cllm`, the method, forwards and tokens per forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid

from cllm.decoding import registry
from cllm.errors import CllmError

# Request fields this server cannot honour: refused when set to anything but their neutral value.
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None,
               "tool_choice": None, "functions": None, "response_format": None}


class RequestError(Exception):
    """A bad request: HTTP 400 with the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Cancelled(Exception):
    """Raised inside a decode whose client went away, or that met a stop string."""


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Engine:
    """One model and one method; `generate` decodes one request, calling `on_text(delta)` as text is committed."""

    def __init__(self, model, tokenizer, method: str, cfg: registry.DecodeConfig, draft=None,
                 model_id: str = "cllm"):
        registry.get(method)
        self.model, self.tok, self.method, self.cfg, self.draft, self.model_id = (
            model, tokenizer, method, cfg, draft, model_id)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.stats = {"requests": 0, "cancelled": 0}
        self.lock = threading.Lock()  # one decode at a time

    def settings(self, body: dict, n_prompt: int) -> tuple[registry.DecodeConfig, int, list[str]]:
        """(decode config, seed, stop strings) of a request, or RequestError."""
        for key, neutral in UNSUPPORTED.items():
            value = body.get(key)
            if value is not None and value is not False and value != neutral:
                raise RequestError(f"'{key}' is not supported by this server", key)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or self.cfg.max_new_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        if self.context and n_prompt + max_tokens > self.context:
            raise RequestError(f"{n_prompt} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
                               f"{self.context}", "max_tokens")
        temperature = body.get("temperature")
        if temperature is not None and not isinstance(temperature, (int, float)):
            raise RequestError("temperature must be a number", "temperature")
        temperature = self.cfg.temperature if temperature is None else float(temperature)
        method = registry.get(self.method)
        if temperature > 0 and not method.sampling:
            raise RequestError(f"method {self.method} is greedy only: temperature must be 0 or unset", "temperature")
        top_p = body.get("top_p")
        if top_p is not None and not isinstance(top_p, (int, float)):
            raise RequestError("top_p must be a number", "top_p")
        cfg = dataclasses.replace(self.cfg, max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=None if top_p in (None, 1, 1.0) else float(top_p))
        try:
            cfg.validate([self.method])
        except CllmError as e:
            raise RequestError(str(e)) from None
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop must be a string or a list of at most 4 non-empty strings", "stop")
        seed = body.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise RequestError("seed must be an integer", "seed")
        return cfg, seed or 0, stop

    def generate(self, prompt_ids: list[int], cfg, seed: int, stop: list[str], on_text=None,
                 cancelled=lambda: False) -> dict:
        """Decode (under the engine's lock); returns text, token counts, finish reason and decoding statistics."""
        tokens, state = [], {"sent": "", "commits": 0, "stopped": False}

        def on_commit(row: int, new: list[int]) -> None:
            tokens.extend(new)
            state["commits"] += 1
            text = self.tok.decode(tokens, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, state["stopped"] = text[:cut], True
            elif text.endswith("\ufffd"):  # a character still being spelled out in bytes: wait for the rest
                return
            if on_text is not None and len(text) > len(state["sent"]):
                on_text(text[len(state["sent"]):])
            state["sent"] = text
            if state["stopped"] or cancelled():
                raise Cancelled

        with self.lock:
            self.stats["requests"] += 1
            try:
                [res] = registry.decode(self.method, self.model, self.tok, [prompt_ids], [seed], cfg, self.draft,
                                        on_commit=on_commit)
                forwards, finish = res.n_forwards, res.finish_reason
            except Cancelled:
                self.stats["cancelled"] += not state["stopped"]
                forwards, finish = state["commits"], "stop" if state["stopped"] else "cancelled"
        text = state["sent"] if state["stopped"] else self.tok.decode(tokens, skip_special_tokens=True)
        if not state["stopped"] and on_text is not None and len(text) > len(state["sent"]):
            on_text(text[len(state["sent"]):])
        return {"text": text, "completion_tokens": len(tokens), "prompt_tokens": len(prompt_ids),
                "finish_reason": "length" if finish == "length" else "stop",
                "cllm": {"method": self.method, "forwards": forwards,
                         "tokens_per_forward": round(len(tokens) / forwards, 4) if forwards else None}}


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


def build_app(engine: Engine):
    """The Starlette application serving `engine`."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                                          "created": 0, "owned_by": "cllm"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "method": engine.method, **engine.stats})

    def endpoint(chat: bool):
        async def handle(request):
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
                ids = (chat_prompt_ids if chat else completion_prompt_ids)(engine.tok, body)
                cfg, seed, stop = engine.settings(body, len(ids))
            except RequestError as e:
                return JSONResponse(error_body(str(e), e.param), status_code=400)
            except json.JSONDecodeError as e:
                return JSONResponse(error_body(f"the request body is not JSON: {e.msg}"), status_code=400)
            meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                    "model": engine.model_id}
            if body.get("stream"):
                return StreamingResponse(_stream(engine, ids, cfg, seed, stop, chat, meta),
                                         media_type="text/event-stream")
            out = await asyncio.get_running_loop().run_in_executor(
                None, lambda: engine.generate(ids, cfg, seed, stop))
            return JSONResponse(_final(out, chat, meta))

        return handle

    routes = [Route("/v1/models", models), Route("/health", health),
              Route("/v1/completions", endpoint(False), methods=["POST"]),
              Route("/v1/chat/completions", endpoint(True), methods=["POST"])]
    return Starlette(routes=routes)


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


async def _stream(engine: Engine, ids, cfg, seed, stop, chat: bool, meta: dict):
    """Server-sent events: deltas as the decode commits them, a last chunk with finish_reason, usage and cllm."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def work():
        try:
            return engine.generate(ids, cfg, seed, stop, lambda t: loop.call_soon_threadsafe(queue.put_nowait, t),
                                   gone.is_set)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    future = loop.run_in_executor(None, work)
    try:
        if chat:
            yield _chunk(meta, chat, None, first=True)
        while (delta := await queue.get()) is not None:
            yield _chunk(meta, chat, delta)
        out = await future
        last = json.loads(_chunk(meta, chat, None, out["finish_reason"])[len("data: "):])
        last.update(usage=_usage(out), cllm=out["cllm"])
        yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
    finally:
        gone.set()  # a client that went away stops the decode at its next committed token


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

    config = uvicorn.Config(build_app(engine), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=60)
    _Server(config).run()


def load_engine(*, model: str, adapter: str | None, draft: str | None, method: str, dtype: str, device: str | None,
                cfg) -> Engine:
    """Load the model (with its adapter) and the draft, checked against each other, into an `Engine`."""
    import torch

    from cllm.models import check_model_spec, load_draft, load_model

    check_model_spec(model, "--model", adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    target, tok = load_model(model, dtype, device, adapter=adapter)
    draft_model = None
    if draft:
        draft_model = load_draft(draft, target, tok, dtype, device)
    model_id = str(model).rstrip("/").split("/")[-1] + (f"+{adapter.rstrip('/').split('/')[-1]}" if adapter else "")
    return Engine(target, tok, method, cfg, draft_model, model_id)
