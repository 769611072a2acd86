"""The `cllm` console script: datastore, decode, eval, gen, train, train-draft, pipeline, export-adapter, export-draft, serve, chat."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from cllm.errors import CllmError

_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

SUBCOMMANDS = {
    "chat": ("cllm.commands.chat", "an interactive terminal chat, answers streamed as tokens are committed"),
    "datastore": ("cllm.commands.datastore", "a datastore of the base's own responses, for gated decoding's retrieval "
                                             "branches"),
    "decode": ("cllm.commands.decode", "decode prompts with AR or Jacobi decoding and compare them"),
    "eval": ("cllm.commands.eval", "evaluate a checkpoint: speed-up vs the base model's AR, quality, plots"),
    "export-adapter": ("cllm.commands.export_adapter", "a trained LoRA adapter in bf16 safetensors, to publish"),
    "export-draft": ("cllm.commands.export_draft", "a distilled draft without the weights it shares with its target"),
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
    parser.commands = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        importlib.import_module(module).add_arguments(p)
        parser.commands[name] = p
    return parser


def yaml_defaults(parser: argparse.ArgumentParser, path: str) -> None:
    """A command's flags from a YAML file, as defaults the command line overrides: keys are the flags' names
    (`block_size`, `max_new_tokens`); an unknown key or a value outside a flag's choices is an error naming it."""
    from cllm.config import read_yaml_mapping

    data = read_yaml_mapping(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    for key, value in data.items():
        if key not in actions:
            raise CllmError(f"{path}: unknown key '{key}' (known keys: {', '.join(sorted(actions))})")
        choices = actions[key].choices
        if choices is not None and value not in choices:
            raise CllmError(f"{path}: '{key}' must be one of {list(choices)}, got {value!r}")
    parser.set_defaults(**data)


# Deprecation notices that libraries raise about each other's calls, not about anything the user wrote: PEFT asks
# transformers 5 `is_gradient_checkpointing` when it loads an adapter, the Trainer reads `gradient_checkpointing`.
QUIET_WARNINGS = (r"`is_gradient_checkpointing` is deprecated", r"`gradient_checkpointing` is deprecated")


def quiet_known_warnings() -> None:
    import warnings

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    if not _has_cuda_driver():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed detects here anyway, without its warning


def _has_cuda_driver() -> bool:
    """Whether an NVIDIA driver is present (cheap: no torch import); DeepSpeed otherwise probes accelerators and
    prints a line about it on every import."""
    return os.path.exists("/proc/driver/nvidia/version")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input) so tests can call it."""
    import importlib

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_warnings()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    if getattr(module, "YAML_DEFAULTS", False) and getattr(args, "config", None):
        try:  # flags from the YAML, then the command line again over them
            yaml_defaults(parser.commands[args.command], args.config)
        except CllmError as e:
            print(f"cllm {args.command}: error: {e}", file=sys.stderr)
            return 2
        args, rest = parser.parse_known_args(argv)
    if rest and not hasattr(module, "pass_through"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if rest:  # flags of another library's config (cllm train: transformers' TrainingArguments)
            module.pass_through(args, rest)
        module.run(args)
    except CllmError as e:
        print(f"cllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # A full disk or a folder this user may not write: the machine's state, not a bug, so one line. What was
        # committed before (checkpoints, rows, trajectory batches) stays, and the same command resumes.
        where = f": {e.filename}" if e.filename else ""
        print(f"cllm {args.command}: error: {e.strerror}{where} (free space or fix permissions, then run the same "
              "command again)", file=sys.stderr)
        return 2
    return 0


def console_main() -> None:
    code = main()  # first: `--help` and bad flags exit here, before torch is imported below
    from cllm.distributed import exit_process

    exit_process(code)


if __name__ == "__main__":
    console_main()
