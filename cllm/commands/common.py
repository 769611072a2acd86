"""What `cllm serve` and `cllm chat` share: the model and decoding flags, and loading the engine from them."""

from __future__ import annotations

import argparse

from cllm.decoding import registry
from cllm.models import DEFAULT_MODEL


def add_model_arguments(p: argparse.ArgumentParser, default_method: str = "jacobi") -> None:
    """Model, method and decoding flags shared by `cllm serve` and `cllm chat`."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder, HF id or .gguf (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder merged into --model")
    p.add_argument("--draft", default=None, help="draft model for sps/mtad/hf_assisted")
    p.add_argument("--method", default=default_method, choices=registry.names(),
                   help="decoding method (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on CUDA or a CPU with AVX512_BF16/AMX, else fp32 (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    registry.add_arguments(p)


def load_engine(args, limits=None):
    """Check the flags, load model (and draft), and return a `cllm.serve.Engine`."""
    from cllm.serve import load_engine as load

    cfg = registry.DecodeConfig.from_args(args)
    cfg.validate([args.method], has_draft=bool(args.draft))
    return load(model=args.model, adapter=args.adapter, draft=args.draft, method=args.method, dtype=args.dtype,
                device=args.device, cfg=cfg, limits=limits)
