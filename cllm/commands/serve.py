"""`cllm serve`: an OpenAI-compatible HTTP server (streaming) over any decoding method; see `cllm.serve`."""

from __future__ import annotations

import argparse

from cllm.decoding import registry
from cllm.errors import CllmError


def add_model_arguments(p: argparse.ArgumentParser, default_method: str = "jacobi") -> None:
    """Model, method and decoding flags shared by `cllm serve` and `cllm chat`."""
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder, HF id or .gguf (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder merged into --model")
    p.add_argument("--draft", default=None, help="draft model for sps/mtad/hf_assisted")
    p.add_argument("--method", default=default_method, choices=registry.names(),
                   help="decoding method (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    registry.add_arguments(p)


def load_engine(args):
    """Check the flags, load model (and draft), and return a `cllm.serve.Engine`."""
    from cllm.models import check_model_spec, load_model
    from cllm.serve import Engine

    cfg = registry.DecodeConfig.from_args(args)
    cfg.validate([args.method], has_draft=bool(args.draft))
    check_model_spec(args.model, "--model", args.adapter)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, args.dtype, device, adapter=args.adapter)
    draft = None
    if args.draft:
        from cllm.models import check_draft_compatible

        draft, draft_tok = load_model(args.draft, args.dtype, device)
        check_draft_compatible(model, tok, draft, draft_tok)
    model_id = str(args.model).rstrip("/").split("/")[-1] + (f"+{args.adapter.rstrip('/').split('/')[-1]}"
                                                              if args.adapter else "")
    return Engine(model, tok, args.method, cfg, draft, model_id)


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
