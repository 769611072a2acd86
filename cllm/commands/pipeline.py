"""`cllm pipeline`: trajectories -> CLLM training (-> more rounds) -> evaluation of base vs trained, one YAML,
resumable; the logic is `cllm.pipeline`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cllm import config
from cllm.pipeline import PipelineConfig, run_pipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, PipelineConfig)


def run(args) -> None:
    cfg = config.resolve(PipelineConfig, {k: v for k, v in vars(args).items() if k != "command"})
    run_pipeline(cfg)  # the eval stage has just printed the base-vs-trained table
    print(f"[cllm pipeline] done: the table above is in {Path(cfg.out_dir) / 'summary.md'}", flush=True)
