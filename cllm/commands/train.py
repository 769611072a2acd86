"""`cllm train` / `train/train_cllm.py`: fine-tune a model on its Jacobi trajectories (CLLM or Jacobi Forcing).

Runs under plain python, `torchrun`, `accelerate launch` and `deepspeed` (pass `--deepspeed configs/deepspeed/*.json`).
Every transformers `TrainingArguments` flag is accepted as well and passed through.
"""

from __future__ import annotations

import argparse
import sys

from cllm import config
from cllm.errors import CllmError
from cllm.training.config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, TrainConfig)
    p.epilog = ("Also every transformers TrainingArguments field as its flag, passed through "
                "(--learning-rate, --max-steps, --save-steps, --bf16, --deepspeed, --report-to, ...).")


def pass_through(args, rest: list[str]) -> None:
    args.trainer = config.pass_through_flags(TrainConfig, rest)


def run(args) -> None:
    from cllm.training.run import train

    cfg = config.resolve(TrainConfig, {k: v for k, v in vars(args).items() if k != "command"})
    try:
        train(cfg)
    except CllmError:
        sys.stderr.write("\n")  # end the progress bar's line so the error stands on its own
        raise
