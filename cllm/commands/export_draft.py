"""`cllm export-draft SRC DST`: a distilled draft without the weights it shares with its target, to publish."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="output folder of `cllm train-draft`")
    p.add_argument("dst", help="folder to write, e.g. models/<name>; load it with `--draft DST` beside its target")
    p.add_argument("--model", default=None,
                   help="the target whose embeddings and LM head the draft shares (default: the one it was trained for)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="(default: %(default)s)")
    p.add_argument("--max-mb", type=float, default=30.0, help="refuse a larger result, in MiB (default: %(default)s)")


def run(args) -> None:
    from cllm.models import export_draft

    info = export_draft(args.src, args.dst, args.model, args.dtype, args.max_mb)
    print(f"{args.dst}: {info['tensors']} tensors, {info['parameters']:,} parameters, "
          f"{info['bytes'] / 2**20:.2f} MiB ({args.dtype}); shared with the target: {', '.join(info['shared'])}")
