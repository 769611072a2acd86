"""Writing state files so that a kill or a power loss leaves either the old file or the new one, never a torn one.

`atomic_write_text`: write a temp file beside the target, fsync it, rename it over the target, fsync the folder
(the rename itself is only durable once the folder's entry is on disk). `fsync_tree`: fsync every file under a
folder and the folders themselves, for outputs written by code we do not own (the Trainer's checkpoints).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(folder: str | Path) -> None:
    """fsync every regular file under `folder`, then every folder, deepest first."""
    folders = []
    for root, dirs, files in os.walk(folder):
        folders.append(root)
        for name in files:
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
    for root in reversed(folders):
        fsync_dir(root)


def method_file_stem(method: str) -> str:
    """A method's name as part of a file name: its options may hold a path (gated's `datastore=`), whose '/' must
    not open a folder."""
    return method.replace("/", "%2F")
