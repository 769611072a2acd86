"""A bounded load test of `cllm serve` on loopback: C concurrent clients x R requests each (the real `openai`
client, chat completions, greedy), every answer checked against `registry.decode` of the same prompt in this
process; prints latency p50/p95, tokens/s over the run and the share of right answers.

    python bench/serve_load.py --model smollm2-135m --method jacobi --clients 8 --requests 5 --max-tokens 32

It starts `cllm serve` itself on a free port and stops it (SIGTERM) at the end; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
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
    from cllm.decoding import registry
    from cllm.models import load_model
    from cllm.data.prompts import format_prompt

    model, tok = load_model(args.model, args.dtype, "cpu")
    cfg = registry.DecodeConfig(block_size=args.block_size, max_new_tokens=args.max_tokens)
    return {p: registry.decode(args.method, model, tok, [format_prompt(tok, p)], [0], cfg)[0].text for p in prompts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="jacobi")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    import openai

    from cllm.data.datasets import load_dataset_prompts

    prompts = [r.prompt for r in load_dataset_prompts("gsm8k", "test", limit=args.clients)]
    want = _references(args, prompts)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([shutil.which("cllm"), "serve", "--model", args.model, "--method", args.method,
                             "--dtype", args.dtype, "--block-size", str(args.block_size), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_up(url, proc)
        latencies, right, tokens, errors = [], [], [0], []

        def client(i: int) -> None:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            for _ in range(args.requests):
                t0 = time.perf_counter()
                try:
                    out = c.chat.completions.create(model="m", max_tokens=args.max_tokens,
                                                    messages=[{"role": "user", "content": prompts[i]}])
                except Exception as e:  # noqa: BLE001 (counted as a wrong answer, printed below)
                    errors.append(repr(e))
                    right.append(False)
                    continue
                latencies.append(time.perf_counter() - t0)
                right.append(out.choices[0].message.content == want[prompts[i]])
                tokens[0] += out.usage.completion_tokens

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    lat = sorted(latencies)
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan")  # noqa: E731
    print(f"{args.clients} clients x {args.requests} requests, {args.method}, {args.max_tokens} tokens, "
          f"{args.dtype}: latency p50 {q(0.5):.2f} s, p95 {q(0.95):.2f} s; {tokens[0] / wall:.2f} tokens/s over "
          f"{wall:.1f} s; right {sum(right)}/{len(right)}; server exit {proc.returncode}")
    for e in errors[:3]:
        print("  error:", e, file=sys.stderr)


if __name__ == "__main__":
    main()
