"""Score the HumanEval answers of an eval's rows again with the sandbox of whatever `cllm` is importable, so two
sandbox versions can be compared on the same texts (issue 48: the hardening must not change a legitimate verdict).

    PYTHONPATH=/path/to/old/checkout python experiments/sandbox_rescore.py ROWS.jsonl --method base_ar --out old.json
    python experiments/sandbox_rescore.py ROWS.jsonl --method base_ar --out new.json --compare old.json

Works with the sandbox API before issue 48 (`humaneval_program` + `run_python`) and after (`humaneval_passes`).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"


def verdict(problem: dict, text: str) -> bool:
    from cllm.eval import quality

    if hasattr(quality, "humaneval_passes"):  # after issue 48: the tests run outside the program
        meta = {"code_prompt": problem["prompt"], "test": problem["test"], "entry_point": problem["entry_point"]}
        return bool(quality.humaneval_passes(meta, text).passed)
    program = quality.humaneval_program(problem["prompt"], problem["test"], problem["entry_point"], text)
    return bool(quality.run_python(program)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="an eval's rows-rank*.jsonl")
    ap.add_argument("--method", default="base_ar", help="whose answers to score")
    ap.add_argument("--out", required=True, help="write {task_id: passed} here")
    ap.add_argument("--compare", help="a previous --out to compare with")
    args = ap.parse_args()
    problems = {p["task_id"]: p for p in map(json.loads, gzip.open(HUMANEVAL, "rt"))}
    rows = [json.loads(line) for line in open(args.rows)]
    rows = {r["id"]: r for r in rows if r["method"] == args.method}
    got = {tid: verdict(problems[tid], r["text"]) for tid, r in sorted(rows.items())}
    Path(args.out).write_text(json.dumps(got, indent=1) + "\n")
    print(f"{args.method}: {sum(got.values())}/{len(got)} pass")
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        differ = sorted(t for t in got if old.get(t) != got[t])
        print(f"same verdict on {len(got) - len(differ)}/{len(got)}; differ: {differ}")


if __name__ == "__main__":
    main()
