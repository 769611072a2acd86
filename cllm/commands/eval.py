"""`cllm eval` / `decode/evaluate.py`: how much faster is a checkpoint, did quality drop, where does the speed come from.

Every method runs on the same prompts, interleaved, beside AR greedy of the base model (`base_ar`, the speed
reference), resumably; see `cllm.eval.runner`. Flags or a YAML `--config` (`EvalConfig`).
"""

from __future__ import annotations

import argparse

from cllm import config
from cllm.eval.config import EvalConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, EvalConfig)


def run(args) -> None:
    from cllm.eval.runner import run_eval

    run_eval(config.resolve(EvalConfig, {k: v for k, v in vars(args).items() if k != "command"}))
