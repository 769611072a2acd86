"""`cllm serve` with the real `openai` client on a loopback port, and `cllm chat` through a pseudo-terminal: the
text equals `cllm decode`'s, streamed or not; concurrent clients; OpenAI-shaped 400s; a dropped stream frees the
server; SIGTERM ends it after the running request."""

from __future__ import annotations

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
from cllm.serve import Engine, build_app

PROMPTS = ["w3 w4 w5", "w10 w11", "w20 w21 w22 w23", "w7"]
MAX = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A server on a free loopback port in this process (uvicorn in a thread), Jacobi n = 4, fp64."""
    import uvicorn

    model, tok = load_model(str(tiny_model_dir), "fp64", "cpu")
    cfg = registry.DecodeConfig(block_size=4, max_new_tokens=MAX)
    engine = Engine(model, tok, "jacobi", cfg, model_id="tiny")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    results = {p: registry.decode("jacobi", model, tok, [format_prompt(tok, p)], [0], cfg)[0] for p in PROMPTS}
    want = {p: r.text for p, r in results.items()}
    tpf = {p: round(r.n_new_tokens / r.n_forwards, 4) for p, r in results.items()}
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "want": want, "tpf": tpf, "model": model, "tok": tok}
    srv.should_exit = True
    thread.join(timeout=10)


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

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
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
    while httpx.get(url + "/health", timeout=5).json()["requests"] < 1:
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
