"""Gated settings side by side on the first HumanEval prompts: tokens per forward and the forward's width (how many
rows a forward carries on average, which sets its cost: in bf16 on the AVX512-BF16 EPYC each row adds ~0.025-0.03
of an AR step, `bench/window_cost.py`). Every setting decodes every prompt in turn in one process; rows are appended
to OUT (jsonl) as they finish and a table is printed at the end. In fp32 every setting's text is the base's greedy
text, so the rates compare on the same text (row g39 of docs/experiments/gated.md chose the datastore's tree rule
this way); the width is the decoder's own count (`forward_rows` among a gated result's stats).

    python experiments/ablation/gated_width_sweep.py --dtype fp32 --limit 10 --max-new-tokens 128 \
        --out runs/sweep.jsonl METHOD [METHOD ...]
"""

import argparse
import collections
import json
import time

import torch

from cllm.data.datasets import load_dataset_prompts
from cllm.data.prompts import format_prompt
from cllm.decoding.registry import DecodeConfig, decode
from cllm.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="+", help="gated methods with their options (NAME:OPTION=VALUE...)")
    ap.add_argument("--adapter", default="models/smollm2-135m-gated-code-block4")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m", dtype=args.dtype, adapter=args.adapter)
    total = {m: collections.Counter() for m in args.methods}
    with open(args.out, "a") as f:
        for rec in load_dataset_prompts(args.dataset, limit=args.limit):
            ids = format_prompt(tok, rec.prompt)
            for m in args.methods:
                t = time.perf_counter()
                [res] = decode(m, model, tok, [ids], [0], DecodeConfig(args.max_new_tokens))
                row = {"id": rec.id, "method": m, "tokens": len(res.token_ids), "forwards": len(res.accept_lengths),
                       "rows": res.extra["forward_rows"], "seconds": time.perf_counter() - t, "token_ids": res.token_ids}
                f.write(json.dumps(row) + "\n")
                f.flush()
                total[m].update({k: row[k] for k in ("tokens", "forwards", "rows", "seconds")})
            print(rec.id, flush=True)
    for m, c in total.items():
        print(f"{c['tokens'] / c['forwards']:.3f} tokens / forward, {c['rows'] / c['forwards']:.1f} rows / forward, "
              f"{c['forwards']} forwards: {m}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
