"""`cllm ablation RUN_DIR...`: the ablation table of finished `cllm pipeline` folders (markdown, optional JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cllm.errors import CllmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`cllm pipeline` output folders, one row each")
    p.add_argument("--method", default="jacobi", help="eval method whose rows are compared (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="TABLE.md",
                   help="also write the table here (and TABLE.json, TABLE.png)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out's TABLE.json (rows whose pipeline folders are gone), "
                        "replacing those of the same name and adding new ones after them")


def run(args) -> None:
    from cllm.ablation import ablation_markdown, ablation_row
    from cllm.plots import plot_ablation

    rows = [ablation_row(r, args.method) for r in args.runs]
    if args.append:
        if not args.out:
            raise CllmError("--append needs --out TABLE.md (its TABLE.json holds the rows to keep)")
        rows = merge_rows(_read_rows(Path(args.out).with_suffix(".json")), rows)
    table = ablation_markdown(rows)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        plot_ablation(rows, out.with_suffix(".png"))


def _read_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        raise CllmError(f"--append: {path} does not exist (write the table once without --append)") from None
    except json.JSONDecodeError as e:
        raise CllmError(f"--append: {path} is not JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise CllmError(f"--append: {path} is not a `cllm ablation` table (a list of rows with a name)")
    return rows


def merge_rows(kept: list[dict], new: list[dict]) -> list[dict]:
    """`kept` in order with each row of the same name replaced by its `new` row, then the other `new` rows."""
    by_name = {r["name"]: r for r in new}
    merged = [by_name.pop(r["name"], r) for r in kept]
    return merged + list(by_name.values())
