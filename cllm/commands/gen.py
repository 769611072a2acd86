"""`cllm gen`: collect Jacobi trajectories of a model over a prompt set (`cllm.data.collect`)."""

from __future__ import annotations

import argparse

from cllm import config
from cllm.data.trajectories import GenConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, GenConfig)


def run(args) -> dict:
    from cllm.data.collect import generate

    given = {k: v for k, v in vars(args).items() if k != "command"}
    return generate(config.resolve(GenConfig, given))
