"""`cllm chat`: an interactive terminal chat that streams each answer as its tokens are committed.

Lines starting with / are commands: /reset (forget the conversation), /method NAME (switch the decoding method),
/quit; Ctrl-D quits too. After each answer one line gives tokens/s and tokens per forward.
"""

from __future__ import annotations

import argparse
import sys
import time

from cllm.commands.common import add_model_arguments, load_engine
from cllm.decoding import registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")


def _command(line: str, engine, history: list[dict], system) -> str | None:
    """Apply a /command; returns a message to print (or None to quit)."""
    word, _, arg = line[1:].partition(" ")
    if word == "quit":
        return None
    if word == "reset":
        history[:] = [{"role": "system", "content": system}] if system else []
        return "(conversation reset)"
    if word == "method":
        name = arg.strip()
        if name not in registry.names():
            return f"(unknown method {name!r}; one of {', '.join(registry.names())})"
        if registry.get(name).needs_draft and engine.draft is None:
            return f"({name} needs --draft)"
        engine.method = name
        return f"(method: {name})"
    return "(commands: /reset, /method NAME, /quit; Ctrl-D quits)"


def run(args) -> None:
    from cllm.data.prompts import format_chat
    from cllm.serve import RequestError

    engine = load_engine(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print(f"cllm chat: {engine.model_id} with {engine.method}; /reset, /method NAME, Ctrl-D to quit", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            msg = _command(line.strip(), engine, history, args.system)
            if msg is None:
                return
            print(msg, flush=True)
            continue
        history.append({"role": "user", "content": line})
        ids = format_chat(engine.tok, history)
        try:
            cfg, seed, stop = engine.settings({}, len(ids))
        except RequestError as e:
            history.pop()
            print(f"({e})", flush=True)
            continue
        t0 = time.perf_counter()
        out = engine.generate(ids, cfg, seed, stop, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        wall = time.perf_counter() - t0
        history.append({"role": "assistant", "content": out["text"]})
        n, tpf = out["completion_tokens"], out["cllm"]["tokens_per_forward"]
        print(f"\n[{n} tokens, {n / wall:.1f} tokens/s, {tpf} tokens per forward, {engine.method}]", flush=True)
