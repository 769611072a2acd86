"""`cllm serve` with the real `openai` client on a loopback port, and `cllm chat` through a pseudo-terminal: the
text equals `cllm decode`'s, streamed or not; concurrent clients; OpenAI-shaped 400s; a dropped stream frees the
server; SIGTERM ends it after the running request."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import threading
import time

import httpx
import openai
import pytest

from cllm.decoding import registry
from cllm.models import load_model
from cllm.data.prompts import format_prompt
from cllm.serve import Engine, Limits, build_app
from conftest import with_random_gated_adapter

PROMPTS = ["w3 w4 w5", "w10 w11", "w20 w21 w22 w23", "w7"]
MAX = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(engine):
    """`engine` served on a free loopback port in this process (uvicorn in a thread); yields the base URL."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A server of Jacobi n = 4 in fp64 with continuous batching (the default --max-batch 8)."""
    model, tok = load_model(str(tiny_model_dir), "fp64", "cpu")
    cfg = registry.DecodeConfig(block_size=4, max_new_tokens=MAX)
    engine = Engine(model, tok, "jacobi", cfg, model_id="tiny")
    with _serving(engine) as url:
        results = {p: registry.decode("jacobi", model, tok, [format_prompt(tok, p)], [0], cfg)[0] for p in PROMPTS}
        want = {p: r.text for p, r in results.items()}
        tpf = {p: round(r.n_new_tokens / r.n_forwards, 4) for p, r in results.items()}
        yield {"url": url, "engine": engine, "want": want, "tpf": tpf, "model": model, "tok": tok}


def _in_threads(fn, n: int, timeout: float) -> None:
    """Run fn(0) .. fn(n - 1) at once, one thread each, and wait for all."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=60)


def test_streamed_and_plain_text_equal_decode(server):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    for p in PROMPTS:
        want = server["want"][p]
        chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=MAX)
        assert chat.choices[0].message.content == want
        assert chat.usage.completion_tokens == MAX or chat.choices[0].finish_reason == "stop"
        extra = chat.model_extra["cllm"]
        assert extra["method"] == "jacobi" and extra["tokens_per_forward"] == server["tpf"][p]
        pieces, finish = [], None
        for chunk in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                               max_tokens=MAX, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert "".join(pieces) == want and finish in ("stop", "length") and len(pieces) > 1
        comp = c.completions.create(model="tiny", prompt=p, max_tokens=MAX)
        assert comp.choices[0].text == want  # the tiny tokenizer has no chat template: the same ids
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt=p,
                                                                              max_tokens=MAX, stream=True))
        assert streamed == want


def test_stop_strings_cut_the_text(server):
    p = PROMPTS[0]
    want = server["want"][p]
    stop = want.split(" ")[1]  # a word in the middle of the answer
    out = _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                                  max_tokens=MAX, stop=[stop])
    assert out.choices[0].message.content == want[: want.find(stop)] and out.choices[0].finish_reason == "stop"


def test_eight_concurrent_clients_are_all_answered_right(server):
    results, errors = {}, []

    def ask(i):
        try:
            p = PROMPTS[i % len(PROMPTS)]
            out = _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                                          max_tokens=MAX)
            results[i] = out.choices[0].message.content == server["want"][p]
        except Exception as e:  # noqa: BLE001 (collected and asserted below)
            errors.append(repr(e))

    _in_threads(ask, 8, timeout=120)
    assert errors == [] and results == {i: True for i in range(8)}


def test_bad_requests_get_400_in_the_openai_shape(server):
    c = _client(server)
    msg = [{"role": "user", "content": "w3"}]
    for kwargs, param in [({"temperature": 0.7}, "temperature"), ({"n": 2}, "n"), ({"max_tokens": 5000}, "max_tokens"),
                          ({"stop": ["a", "b", "c", "d", "e"]}, "stop")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=msg, **kwargs)
        assert e.value.status_code == 400 and e.value.body["param"] == param and e.value.body["message"]
    r = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_a_dropped_stream_stops_its_decode_and_frees_the_server(server):
    before = httpx.get(server["url"] + "/health").json()["cancelled"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "w3 w4"}], "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                break  # one token arrived: hang up
    deadline = time.time() + 30
    while httpx.get(server["url"] + "/health").json()["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(server["url"] + "/health").json()["cancelled"] == before + 1
    out = _client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}],
                                                  max_tokens=MAX)
    assert out.choices[0].message.content == server["want"][PROMPTS[1]]


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_ends_the_server_after_the_running_request(tmp_path):
    # a model that never stops early: no EOS anywhere, so the 1000-token request is still running at SIGTERM
    import torch

    from cllm.decoding.common import eos_ids
    from conftest import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "no-eos"
    tiny_model(1, torch.float32).save_pretrained(model_dir)  # its generation config has no EOS
    tok = tiny_tokenizer()
    tok.eos_token = None
    tok.save_pretrained(model_dir)
    assert eos_ids(*load_model(str(model_dir), "fp32", "cpu")) == set()
    exe = shutil.which("cllm")
    port = _free_port()
    proc = _start([exe, "serve", "--model", str(model_dir), "--method", "ar", "--port", str(port),
                   "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    deadline, up = time.time() + 300, False  # a loaded machine can take a while to import torch
    while not up and time.time() < deadline and proc.poll() is None:
        try:
            up = httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            time.sleep(0.2)
    assert up, proc.stdout.read() if proc.poll() is not None else "server not up after 300 s"
    got = {}

    def long_request():
        body = {"model": "x", "prompt": "w3 w4", "max_tokens": 1000}
        got["response"] = httpx.post(url + "/v1/completions", json=body, timeout=120)

    t = threading.Thread(target=long_request)
    t.start()
    while httpx.get(url + "/health", timeout=5).json()["running"] < 1:  # decoding now, not finished
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert got["response"].status_code == 200  # the running request was finished first
    assert got["response"].json()["usage"]["completion_tokens"] == 1000  # not cut short
    assert proc.wait(timeout=60) == 0


def _read_until(fd: int, marker: str, timeout: float = 60) -> str:
    buf, deadline = "", time.time() + timeout
    while marker not in buf and time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                buf += os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:
                break
    assert marker in buf, buf
    return buf


def test_chat_in_a_pseudo_terminal(tiny_model_dir, server):
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([shutil.which("cllm"), "chat", "--model", str(tiny_model_dir), "--method", "jacobi",
                             "--block-size", "4", "--max-new-tokens", str(MAX), "--dtype", "fp32"],
                            stdin=child_fd, stdout=child_fd, stderr=child_fd, close_fds=True)
    os.close(child_fd)
    try:
        _read_until(main_fd, "> ", timeout=300)  # a loaded machine can take a while to import torch
        os.write(main_fd, b"w3 w4 w5\n")
        out = _read_until(main_fd, "tokens per forward, jacobi]")
        assert server["want"]["w3 w4 w5"].strip().split(" ")[0] in out  # the answer was streamed to the screen
        os.write(main_fd, b"/method ar\n")
        _read_until(main_fd, "(method: ar)")
        os.write(main_fd, b"/reset\n")
        _read_until(main_fd, "(conversation reset)")
        os.write(main_fd, b"w3 w4 w5\n")
        _read_until(main_fd, "tokens per forward, ar]")
        os.write(main_fd, b"\x04")  # Ctrl-D on an empty line: end of input
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)


def test_serve_refuses_bad_flags(tiny_model_dir, tmp_path):
    from cllm.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert main(["serve", "--model", str(tiny_model_dir), "--method", "sps"]) == 2  # needs --draft


# ------------------------------------------------------------------------------ load, limits and the edges (issue 46)

def _ask(url: str, prompt: str, max_tokens: int = MAX, **kw):
    c = openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=120)
    return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                     max_tokens=max_tokens, **kw)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("method", ["ar", "jacobi", "gated"])
def test_concurrent_requests_share_forwards_and_each_equals_its_solo_decode(tiny_model_dir, method, monkeypatch):
    """Eight clients at once, prompts and lengths all different, in fp32: they join and leave one running batch,
    every answer is the solo greedy decode (gated: with a gated adapter, the base's greedy output), and the server
    ran fewer forwards than the answers did in all."""
    from cllm.decoding import continuous

    step = continuous.ContinuousBatch.step

    def slow_step(self, joining):  # the tiny model decodes faster than clients arrive on a fast CI machine
        time.sleep(0.03)
        return step(self, joining)

    monkeypatch.setattr(continuous.ContinuousBatch, "step", slow_step)
    model, tok = load_model(str(tiny_model_dir), "fp32", "cpu")
    if method == "gated":
        model = with_random_gated_adapter(model)
    cfg = registry.DecodeConfig(block_size=4, max_new_tokens=40)
    prompts = [f"w{3 + i} w{30 - i}" + " w9" * (i % 3) for i in range(8)]
    lengths = [8 + 4 * i for i in range(8)]
    want = {p: registry.decode(method, model, tok, [format_prompt(tok, p)], [0],
                               registry.DecodeConfig(block_size=4, max_new_tokens=n))[0].text
            for p, n in zip(prompts, lengths)}
    engine = Engine(model, tok, method, cfg, model_id="tiny", limits=Limits(max_batch=8))
    with _serving(engine) as url:
        got, errors = {}, []

        def client(i):
            try:
                time.sleep(0.05 * i)  # arrivals spread out: later ones join a batch already running
                got[i] = _ask(url, prompts[i], lengths[i])
            except Exception as e:  # noqa: BLE001 (asserted below)
                errors.append(repr(e))

        _in_threads(client, 8, timeout=300)
        assert errors == []
        assert {i: r.choices[0].message.content for i, r in got.items()} == {i: want[p] for i, p in enumerate(prompts)}
        answered = sum(r.model_extra["cllm"]["forwards"] for r in got.values())
        assert _metric(url, "cllm_forwards_total") < answered  # rows shared forwards
        assert _metric(url, "cllm_generation_tokens_total") == sum(r.usage.completion_tokens for r in got.values())
        assert _metric(url, 'cllm_requests_total{outcome="ok"}') == 8


def test_metrics_in_prometheus_text_format(server):
    _ask(server["url"], PROMPTS[0])
    text = httpx.get(server["url"] + "/metrics", timeout=10).text
    for name in ("cllm_queue_length", "cllm_running_rows", "cllm_tokens_per_second", "cllm_tokens_per_forward",
                 "cllm_request_latency_seconds_bucket", "cllm_time_to_first_token_seconds_count",
                 "cllm_generation_tokens_total", "cllm_forwards_total"):
        assert f"\n{name}" in text, name
    assert _metric(server["url"], "cllm_tokens_per_forward") > 0


def test_body_limits_and_malformed_bodies_are_openai_errors(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), "fp64", "cpu")
    engine = Engine(model, tok, "ar", registry.DecodeConfig(max_new_tokens=4), model_id="tiny",
                    limits=Limits(max_body_bytes=4000))
    with _serving(engine) as url:
        chat = url + "/v1/chat/completions"
        r = httpx.post(chat, json={"messages": [{"role": "user", "content": "w3 " * 2000}]}, timeout=10)
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("the request body is over 4000")
        r = httpx.post(chat, content=b'{"messages": "\xff\xfe"}', timeout=10)
        assert r.status_code == 400 and "not UTF-8" in r.json()["error"]["message"]
        r = httpx.post(chat, content=b"[" * 1500 + b"]" * 1500, timeout=10)  # deeper than json can parse
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = httpx.post(chat, content=b"[1, 2]", timeout=10)
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_max_tokens_must_be_a_positive_integer_within_the_limit(server):
    for value in (0, True, 1.5, -3, "8", 5000):
        r = httpx.post(server["url"] + "/v1/chat/completions", timeout=10,
                       json={"messages": [{"role": "user", "content": "w3"}], "max_tokens": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", value


def test_api_key(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), "fp64", "cpu")
    engine = Engine(model, tok, "ar", registry.DecodeConfig(max_new_tokens=4), model_id="tiny",
                    limits=Limits(api_key="s3cret"))
    with _serving(engine) as url:
        for key in ("none", "s3cre", "s3crett"):
            with pytest.raises(openai.AuthenticationError):
                _ask(url, "w3", api_key=key)
        assert _ask(url, "w3", api_key="s3cret").choices[0].message.content is not None
        assert httpx.get(url + "/health", timeout=10).status_code == 200  # health and metrics stay open
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401


def _no_eos_model(tmp_path):
    """A saved tiny model that never ends early (no EOS anywhere): long requests stay running."""
    import torch

    from conftest import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "no-eos"
    tiny_model(1, torch.float32).save_pretrained(model_dir)
    tok = tiny_tokenizer()
    tok.eos_token = None
    tok.save_pretrained(model_dir)
    return model_dir


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    model, tok = load_model(str(_no_eos_model(tmp_path)), "fp32", "cpu")
    engine = Engine(model, tok, "ar", registry.DecodeConfig(max_new_tokens=4), model_id="tiny",
                    limits=Limits(max_batch=1, max_queue=1))
    with _serving(engine) as url:
        statuses = []

        def post():
            r = httpx.post(url + "/v1/completions", json={"prompt": "w3 w4", "max_tokens": 1000}, timeout=120)
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)  # one runs (1000 tokens), one waits, the rest find the queue full
        for t in threads:
            t.join(timeout=120)
        full = [s for s in statuses if s[0] == 503]
        assert len(full) >= 1 and all(s[1] == "1" and s[2]["error"]["type"] == "server_error" for s in full)
        assert sum(s[0] == 200 for s in statuses) >= 2


def test_a_plain_request_whose_client_hung_up_stops_decoding(tmp_path):
    model, tok = load_model(str(_no_eos_model(tmp_path)), "fp32", "cpu")
    engine = Engine(model, tok, "ar", registry.DecodeConfig(max_new_tokens=4), model_id="tiny",
                    limits=Limits(max_tokens_limit=100000))
    with _serving(engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "w3 w4", "max_tokens": 900}, timeout=0.5)
        deadline = time.time() + 20
        while httpx.get(url + "/health").json()["cancelled"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health").json()
        assert health["cancelled"] == 1 and health["running"] == 0


def test_streamed_text_equals_plain_text_with_stop_strings_across_commits(tiny_model_dir):
    """A stop string whose first part arrives in one commit and the rest in the next: the stream holds the first
    part back, so what it sent is the plain answer, cut where the stop string starts."""
    model, tok = load_model(str(tiny_model_dir), "fp64", "cpu")
    engine = Engine(model, tok, "ar", registry.DecodeConfig(max_new_tokens=MAX), model_id="tiny")
    with _serving(engine) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        full = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=MAX).choices[0].text
        words = full.split(" ")
        checked = 0
        for i in range(1, len(words) - 1):
            stop = words[i][-1] + " " + words[i + 1][:1]  # spans two tokens: two commits of AR
            plain = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=MAX, stop=[stop]).choices[0]
            streamed = "".join(ch.choices[0].text for ch in c.completions.create(
                model="tiny", prompt=PROMPTS[2], max_tokens=MAX, stop=[stop], stream=True))
            assert streamed == plain.text == full[: full.find(stop)], stop
            checked += 1
        assert checked >= 3


def test_a_failed_decode_is_a_500_or_a_final_error_event_and_the_server_goes_on(server, monkeypatch):
    model = server["model"]
    real = model.forward

    def boom(*args, **kwargs):
        raise RuntimeError("the accelerator caught fire")

    monkeypatch.setattr(model, "forward", boom)
    r = httpx.post(server["url"] + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "w3"}], "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "caught fire" in r.json()["error"]["message"]
    events = []
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "w3"}], "max_tokens": 4, "stream": True}) as s:
        assert s.status_code == 200
        events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    monkeypatch.setattr(model, "forward", real)
    assert _ask(server["url"], PROMPTS[1]).choices[0].message.content == server["want"][PROMPTS[1]]


def test_tokenizing_a_huge_prompt_does_not_stall_other_clients(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), "fp64", "cpu")
    engine = Engine(model, tok, "ar", registry.DecodeConfig(max_new_tokens=4), model_id="tiny")
    slow = threading.Event()
    real_call = type(tok).__call__

    class SlowTokenizer(type(tok)):  # a tokenizer that takes 3 s on one prompt, as a huge one would
        def __call__(self, text, *a, **kw):
            if text.startswith("SLOW"):
                slow.set()
                time.sleep(3)
            return real_call(self, text, *a, **kw)

    tok.__class__ = SlowTokenizer
    try:
        with _serving(engine) as url:
            t = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", timeout=30,
                                                           json={"prompt": "SLOW w3", "max_tokens": 2}))
            t.start()
            assert slow.wait(10)
            t0 = time.perf_counter()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            assert time.perf_counter() - t0 < 1.0  # served while the other prompt is being tokenized
            t.join(timeout=30)
    finally:
        tok.__class__ = SlowTokenizer.__mro__[1]
