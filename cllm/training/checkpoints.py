"""Which checkpoint a resumed run continues from: the newest complete one, said aloud.

A run killed while saving (or on a full disk) leaves a `checkpoint-N` folder without its trainer state or weights;
transformers' `get_last_checkpoint` would pick it and the resume would crash. The Trainer writes a checkpoint's
`trainer_state.json` after its weights, optimizer and RNG states, and rotates older checkpoints out only after
that, so a checkpoint whose trainer state parses and which holds weights (full, adapter or DeepSpeed) is complete,
and the newest such one is always there: the completion mark a temp-name-and-rename would give, without
overriding the Trainer's private saving code.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from cllm.errors import CllmError

_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def is_complete(folder: Path) -> bool:
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):  # missing, or torn by a kill mid-write
        return False
    has_weights = any((folder / w).is_file() for w in _WEIGHTS) or any(folder.glob("global_step*"))
    return has_weights


def checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders of output_dir, newest (largest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def resume_checkpoint(output_dir: str | Path, command: str) -> str | None:
    """The newest complete checkpoint, or None (then the run starts from scratch); incomplete newer ones are named
    and skipped, not deleted."""
    skipped = []
    for folder in checkpoints(output_dir):
        if is_complete(folder):
            note = f" (skipped incomplete {', '.join(p.name for p in skipped)})" if skipped else ""
            print(f"[{command}] --resume: continuing from {folder}{note}", file=sys.stderr)
            return str(folder)
        skipped.append(folder)
    note = f" complete (incomplete: {', '.join(p.name for p in skipped)})" if skipped else ""
    print(f"[{command}] --resume: no{note} checkpoint in {output_dir}, starting from scratch", file=sys.stderr)
    return None


def check_kind(checkpoint: str, use_peft: bool, flag: str = "--use-peft") -> None:
    """A LoRA checkpoint resumes only as LoRA and a full one only as full training: say which, before any load."""
    folder = Path(checkpoint)
    is_adapter = any((folder / w).is_file() for w in ("adapter_model.safetensors", "adapter_model.bin"))
    if is_adapter and not use_peft:
        raise CllmError(f"{folder} is a LoRA checkpoint: resume it with {flag} (and the same LoRA options)")
    if use_peft and not is_adapter and not any(folder.glob("global_step*")):
        raise CllmError(f"{folder} is a full fine-tuning checkpoint: resume it without {flag}")
