"""What a datastore would add to a finished gated run, without a model: at each forward of METHOD's rows (where it
stood in its text, what it committed), the longest branch the datastore proposes for the text committed so far is
matched against the text that followed; that forward is counted as committing the larger of the two. A
first-order estimate (the decode would then stand elsewhere in its text), used to choose the datastore's
settings before a run (row g38 of docs/experiments/gated.md); rates only. It reads the generated text only (the
rows hold no prompt ids); the decoder also matches suffixes that reach into the prompt.

    python experiments/ablation/datastore_estimate.py runs/eval/RUN/rows-rank0.jsonl METHOD STORE.npz \
        [--candidates 1 2] [--tokens 10] [--share 0.1 0.3]
"""

import argparse
import json

from cllm.decoding.datastore import load_datastore
from cllm.decoding.gated import accept_length


def estimate(rows: list[dict], store, candidates: int, tokens: int,
             share: float | None = None) -> tuple[float, float, float, float]:
    """(the run's tokens per forward, the estimate with the store, the share of forwards the store would lengthen,
    the store's rows per forward)."""
    committed = best = forwards = longer = spent = 0
    for r in rows:
        text, pos = r["token_ids"], 0
        for a in r["accept_lengths"]:
            retrieved = 1  # a branch the base confirms for m tokens commits m + 1
            for branch in store.continuations(text[:pos], candidates, tokens, min_share=share):
                spent += len(branch)
                retrieved = max(retrieved, accept_length(branch, text[pos : pos + len(branch)]) + 1)
            committed, best, forwards = committed + a, best + max(a, retrieved), forwards + 1
            longer += retrieved > a
            pos += a
    return committed / forwards, best / forwards, longer / forwards, spent / forwards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", help="a `cllm eval` rows file")
    ap.add_argument("method", help="the method whose rows to read, as the rows name it")
    ap.add_argument("store", help="a `cllm datastore` file")
    ap.add_argument("--candidates", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--share", type=float, nargs="*", default=[],
                    help="also the tree rule with these shares (datastore_share)")
    args = ap.parse_args()
    with open(args.rows) as f:
        rows = [r for r in map(json.loads, f) if r["method"] == args.method]
    if not rows:
        raise SystemExit(f"{args.rows}: no rows of method {args.method!r}")
    store = load_datastore(args.store)
    for share in [None, *args.share]:
        for c in args.candidates:
            base, est, longer, spent = estimate(rows, store, c, args.tokens, share)
            rule = "whole continuations" if share is None else f"tree, share {share:g}"
            print(f"{len(rows)} prompts, {c} branch(es) of {args.tokens}, {rule}: {base:.3f} -> {est:.3f} tokens per "
                  f"forward ({est / base - 1:+.1%}); the store lengthens {longer:.1%} of the forwards and spends "
                  f"{spent:.1f} rows per forward")


if __name__ == "__main__":
    main()
