"""`cllm ablation RUN_DIR...`: the ablation table of finished `cllm pipeline` folders (markdown, optional JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`cllm pipeline` output folders, one row each")
    p.add_argument("--method", default="jacobi", help="eval method whose rows are compared (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="TABLE.md",
                   help="also write the table here (and TABLE.json, TABLE.png)")


def run(args) -> None:
    from cllm.ablation import ablation_markdown, ablation_row
    from cllm.plots import plot_ablation

    rows = [ablation_row(r, args.method) for r in args.runs]
    table = ablation_markdown(rows)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        plot_ablation(rows, out.with_suffix(".png"))
