"""Which checkpoint a resumed run continues from: the newest complete one, said aloud; and what makes one complete.

The Trainer writes a checkpoint's files in an order (weights, optimizer, RNG, then `trainer_state.json`) but does
not fsync them, so after a power loss the order says nothing: a valid trainer state can sit beside torn weights.
After every save, `SealCallback` fsyncs the checkpoint's files and folders, then writes a completion marker
(`MARKER`, itself written to a temp name, fsynced and renamed) that lists each file with its size and SHA-256. A
checkpoint is complete only when its marker parses and every listed file is there with that size and hash: a
missing or torn marker, or a truncated or zeroed file, means "incomplete", and the resume skips it and names it.
Incomplete checkpoints are never deleted.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from cllm.errors import CllmError
from cllm.fileio import atomic_write_text, fsync_tree

MARKER = "cllm_checkpoint.json"

_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER and not p.name.startswith("."))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal(folder: str | Path) -> None:
    """Make a saved checkpoint durable and mark it complete (see the module docstring)."""
    folder = Path(folder)
    fsync_tree(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    atomic_write_text(folder / MARKER, json.dumps({"files": files}, indent=1) + "\n")


def is_complete(folder: Path) -> bool:
    """The marker parses and lists a trainer state and weights, each listed file is there, whole and unchanged."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):  # missing, or torn by a kill mid-write
        return False
    names = set(files)
    has_weights = any(w in names for w in _WEIGHTS) or any(n.startswith("global_step") for n in names)
    if not has_weights or "trainer_state.json" not in names:
        return False
    for name, want in files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != want["bytes"] or _sha256(p) != want["sha256"]:
            return False
    return True


def seal_callback():
    """A TrainerCallback that seals each checkpoint right after the Trainer saved it (rank 0)."""
    from transformers import TrainerCallback

    class SealCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                seal(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return SealCallback()


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
