"""The `cllm` console script: decode, eval, gen, train, train-draft, pipeline, export-adapter, serve, chat."""

from __future__ import annotations

import argparse
import os
import sys

from cllm.errors import CllmError

SUBCOMMANDS = {
    "chat": ("cllm.commands.chat", "an interactive terminal chat, answers streamed as tokens are committed"),
    "decode": ("cllm.commands.decode", "decode prompts with AR or Jacobi decoding and compare them"),
    "eval": ("cllm.commands.eval", "evaluate a checkpoint: speed-up vs the base model's AR, quality, plots"),
    "export-adapter": ("cllm.commands.export_adapter", "a trained LoRA adapter in bf16 safetensors, to publish"),
    "gen": ("cllm.commands.gen", "collect Jacobi trajectories (resumable, sharded, batched)"),
    "pipeline": ("cllm.commands.pipeline", "trajectories -> training -> base-vs-trained evaluation, one config"),
    "serve": ("cllm.commands.serve", "an OpenAI-compatible HTTP server (streaming) over any decoding method"),
    "train": ("cllm.commands.train", "train a consistency LLM on Jacobi trajectories (CLLM or Jacobi Forcing)"),
    "train-draft": ("cllm.commands.draft", "cut a small draft out of the target and distil it (for SpS / MTAD)"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="cllm", description="Consistency LLMs and multi-token decoding.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input) so tests can call it."""
    import importlib

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        module.run(args)
    except CllmError as e:
        print(f"cllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def console_main() -> None:
    code = main()  # first: `--help` and bad flags exit here, before torch is imported below
    from cllm.distributed import exit_process

    exit_process(code)


if __name__ == "__main__":
    console_main()
