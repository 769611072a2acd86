"""A bounded load test of `cllm serve` on loopback: C concurrent clients, each sending requests one after another
(the real `openai` client, streamed chat completions, greedy) until it has sent R or the soak time is up; every
answer is checked against `registry.decode` of the same prompt in this process. Prints latency p50/p95, time to
first token p50/p95, tokens/s over the run, right answers and HTTP errors, and writes them as JSON with --out.

    python bench/serve_load.py --method ar --dtype bf16 --clients 8 --requests 4 --max-tokens 32 --max-batch 8
    python bench/serve_load.py --method ar --dtype bf16 --clients 8 --requests 4 --max-tokens 32 --max-batch 1
    python bench/serve_load.py --method gated --adapter models/smollm2-135m-gated-gsm8k --block-size 4 --dtype fp32

It starts `cllm serve` itself on a free loopback port and stops it (SIGTERM) at the end; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"server did not come up: {proc.stdout.read() if proc.poll() is not None else 'timeout'}")


def _references(args, prompts: list[str]) -> dict[str, str]:
    from cllm.data.prompts import format_prompt
    from cllm.decoding import registry
    from cllm.models import ModelSpec

    loaded = ModelSpec(model=args.model, adapter=args.adapter, dtype=args.dtype, device="cpu").load()
    model, tok = loaded.model, loaded.tokenizer
    cfg = registry.DecodeConfig(block_size=args.block_size, max_new_tokens=args.max_tokens)
    return {p: registry.decode(args.method, model, tok, [format_prompt(tok, p)], [0], cfg)[0].text for p in prompts}


def _one(client, prompt: str, max_tokens: int) -> tuple[str, float | None, int]:
    """(text, seconds to the first token, completion tokens) of one streamed request."""
    t0, first, pieces, tokens = time.perf_counter(), None, [], 0
    for chunk in client.chat.completions.create(model="m", max_tokens=max_tokens, stream=True,
                                                messages=[{"role": "user", "content": prompt}]):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    return "".join(pieces), first, tokens


def _load(args, url: str, prompts: list[str], want: dict) -> dict:
    import openai

    stats = {"latency": [], "ttft": [], "tokens": 0, "right": 0, "wrong": 0, "errors": []}
    deadline = time.perf_counter() + args.duration if args.duration else float("inf")

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        for k in range(args.requests):
            if time.perf_counter() > deadline:
                return
            prompt = prompts[(i * args.requests + k) % len(prompts)]
            t0 = time.perf_counter()
            try:
                text, first, tokens = _one(c, prompt, args.max_tokens)
            except Exception as e:  # noqa: BLE001 (counted and printed)
                stats["errors"].append(repr(e)[:300])
                continue
            stats["latency"].append(time.perf_counter() - t0)
            stats["ttft"].append(first if first is not None else float("nan"))
            stats["tokens"] += tokens
            stats["right" if text == want[prompt] else "wrong"] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["wall"] = time.perf_counter() - t0
    return stats


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", default=None, help="the server's --adapter (a gated adapter for --method gated)")
    ap.add_argument("--method", default="ar")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client at most")
    ap.add_argument("--duration", type=float, default=0, help="stop sending new requests after this many seconds")
    ap.add_argument("--prompts", type=int, default=32, help="distinct GSM8K prompts, cycled over the requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (1: one at a time)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    from cllm.data.datasets import load_dataset_prompts
    from cllm.machine import machine_tag

    prompts = [r.prompt for r in load_dataset_prompts("gsm8k", "test", limit=min(args.prompts, args.clients * args.requests))]
    want = _references(args, prompts)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([shutil.which("cllm"), "serve", "--model", args.model, "--method", args.method,
                             "--dtype", args.dtype, "--block-size", str(args.block_size), "--port", str(port),
                             "--max-batch", str(args.max_batch), "--log-level", "warning",
                             *(["--adapter", args.adapter] if args.adapter else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_up(url, proc)
        stats = _load(args, url, prompts, want)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    result = {"args": vars(args), "machine": machine_tag(), "requests": len(stats["latency"]) + len(stats["errors"]),
              "right": stats["right"], "wrong": stats["wrong"], "errors": len(stats["errors"]),
              "latency_p50_s": _quantile(stats["latency"], 0.5), "latency_p95_s": _quantile(stats["latency"], 0.95),
              "ttft_p50_s": _quantile(stats["ttft"], 0.5), "ttft_p95_s": _quantile(stats["ttft"], 0.95),
              "tokens_per_s": stats["tokens"] / stats["wall"], "wall_s": stats["wall"], "server_exit": proc.returncode}
    print(f"{args.clients} clients x {args.requests} requests, {args.method}, {args.max_tokens} tokens, {args.dtype}, "
          f"--max-batch {args.max_batch}: latency p50 {result['latency_p50_s']:.2f} s, p95 "
          f"{result['latency_p95_s']:.2f} s; first token p50 {result['ttft_p50_s']:.2f} s, p95 "
          f"{result['ttft_p95_s']:.2f} s; {result['tokens_per_s']:.2f} tokens/s over {stats['wall']:.1f} s; right "
          f"{stats['right']}/{result['requests']}, errors {result['errors']}; server exit {proc.returncode}; "
          f"{result['machine']}")
    for e in stats["errors"][:3]:
        print("  error:", e, file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
