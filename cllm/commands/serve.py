"""`cllm serve`: an OpenAI-compatible HTTP server (streaming) over any decoding method; see `cllm.serve`."""

from __future__ import annotations

import argparse

from cllm.commands.common import add_model_arguments, load_engine
from cllm.errors import CllmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CllmError(f"--port must be in 0 .. 65535, got {args.port}")
    from cllm.serve import serve

    engine = load_engine(args)
    print(f"[cllm serve] {engine.model_id} with {engine.method} on http://{args.host}:{args.port}/v1", flush=True)
    serve(engine, args.host, args.port, args.log_level)
