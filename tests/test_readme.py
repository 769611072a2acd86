"""Every `cllm` command in the README's shell blocks (directly, or through torchrun / deepspeed and the entry
scripts) parses: the subcommand and each flag exist, --compare names known methods, pass-through flags are
TrainingArguments fields, and the repo files it names (configs, published models) are there. Running them is the
job of the other tests; this catches a flag renamed under the guide's feet."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cllm import config
from cllm.cli import SUBCOMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"decode/decode.py": "decode", "decode/evaluate.py": "eval", "data_gen/generate_trajectories.py": "gen",
           "train/train_cllm.py": "train", "train/train_draft.py": "train-draft"}
LAUNCHERS = ("torchrun", "deepspeed")


def readme_commands(text: str) -> list[list[str]]:
    """The argv (after `cllm`) of each cllm command in the ```bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 ...
                words = words[1:]
            if not words or "..." in words:
                continue
            if words[0] in LAUNCHERS:
                if "-m" in words and words[words.index("-m") + 1] == "cllm.cli":
                    words = ["cllm", *words[words.index("-m") + 2:]]
                else:
                    script = next((i for i, w in enumerate(words) if w in SCRIPTS), None)
                    assert script is not None, f"README: a launcher line runs no known entry script: {line}"
                    words = ["cllm", SCRIPTS[words[script]], *words[script + 1:]]
            if words[0] == "cllm":
                out.append([re.sub(r"^\$\w+$", "0", w) for w in words[1:]])
    return out


COMMANDS = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))


def test_the_reader_finds_every_task():
    assert {argv[0] for argv in COMMANDS} >= {"decode", "gen", "train", "eval", "pipeline", "serve", "chat",
                                             "train-draft"}
    assert any("mtad" in argv for argv in COMMANDS)
    # the reader itself: a made-up block yields its command, launcher and continuation line included
    made = "```bash\nOMP_NUM_THREADS=1 torchrun --nproc_per_node 2 decode/decode.py --limit 2 \\\n  --quiet  # c\n```"
    assert readme_commands(made) == [["decode", "--limit", "2", "--quiet"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:70] for a in COMMANDS])
def test_readme_command_parses(argv):
    import importlib

    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"README command does not parse: cllm {' '.join(argv)}")
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    if rest:
        assert hasattr(module, "pass_through"), f"unknown flags {rest} in: cllm {' '.join(argv)}"
        from cllm.training.config import TrainConfig

        config.pass_through_flags(TrainConfig, rest)
    if getattr(args, "compare", None):
        from cllm.decoding import registry

        assert all(registry.known(m) for m in args.compare.split(",")), args.compare
    for key in ("config", "adapter", "draft", "deepspeed"):
        value = getattr(args, key, None) or (rest[rest.index("--" + key) + 1] if "--" + key in rest else None)
        if value and value.split("/")[0] in ("configs", "models", "experiments"):
            assert (REPO / value).exists(), f"README names {value}, which is not in the repository"
