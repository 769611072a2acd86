"""`cllm train-draft` / `train/train_draft.py`: cut a small draft out of the target and distil it (for SpS / MTAD).

The draft keeps the target's embeddings and LM head (frozen, so they stay shared) and a few evenly spaced decoder
layers, trained with forward KL to the target's next-token distributions on dataset text (prompt + reference
answer) and/or on `cllm gen` output (the target's own answers). Resumable; `cllm decode --draft OUTPUT_DIR` loads it.
Every transformers `TrainingArguments` flag is accepted as well and passed through.
"""

from __future__ import annotations

import argparse
import json

from cllm import config
from cllm.training.config import DraftConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, DraftConfig)
    p.epilog = "Also every transformers TrainingArguments field as its flag, passed through (--max-steps, --bf16, ...)."


def pass_through(args, rest: list[str]) -> None:
    args.trainer = config.pass_through_flags(DraftConfig, rest)


def run(args) -> None:
    from cllm.training.draft import train_draft

    cfg = config.resolve(DraftConfig, {k: v for k, v in vars(args).items() if k != "command"})
    print(json.dumps(train_draft(cfg), indent=2))
