"""`cllm export-adapter SRC DST`: a trained LoRA adapter in bf16 safetensors, small enough to publish."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="adapter folder of a LoRA run (OUTPUT_DIR/adapter)")
    p.add_argument("dst", help="folder to write, e.g. models/<name>; load it with `--adapter DST`")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="(default: %(default)s)")
    p.add_argument("--max-mb", type=float, default=20.0, help="refuse a larger result, in MiB (default: %(default)s)")


def run(args) -> None:
    from cllm.models import export_adapter

    info = export_adapter(args.src, args.dst, args.dtype, args.max_mb)
    print(f"{args.dst}: {info['tensors']} tensors, {info['parameters']:,} parameters, "
          f"{info['bytes'] / 2**20:.2f} MiB ({args.dtype})")
