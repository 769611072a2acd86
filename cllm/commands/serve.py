"""`cllm serve`: an OpenAI-compatible HTTP server (streaming) over any decoding method; see `cllm.serve`."""

from __future__ import annotations

import argparse
import os

from cllm.commands.common import add_model_arguments, load_engine
from cllm.errors import CllmError
from cllm.serve import Limits


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    limits = Limits()
    p.add_argument("--max-batch", type=int, default=limits.max_batch,
                   help="requests decoded together by continuous batching (ar, jacobi); 1: one at a time "
                        "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=limits.max_queue,
                   help="requests waiting beyond the running ones; more get 503 (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=limits.max_tokens_limit,
                   help="the largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes,
                   help="larger request bodies get 413 (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("CLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $CLLM_API_KEY, else none)")


def run(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CllmError(f"--port must be in 0 .. 65535, got {args.port}")
    from cllm.serve import serve

    limits = Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                    max_body_bytes=args.max_body_bytes, api_key=args.api_key)
    limits.validate()  # before the model loads
    engine = load_engine(args, limits)
    mode = f"continuous batching of up to {limits.max_batch}" if engine.batching else "one request at a time"
    print(f"[cllm serve] {engine.model_id} with {engine.method} ({mode}) on http://{args.host}:{args.port}/v1",
          flush=True)
    serve(engine, args.host, args.port, args.log_level)
