"""What the gated rate would be if the next guess's first token were always right: gated decoding where, after each
forward, that token is replaced by the base's true one (from a base AR decode of the same prompt). An upper bound
for a better first guess token (the sampler head, row g13 of docs/experiments/gated.md); rates only.

    python experiments/ablation/oracle_first_token.py ADAPTER --limit 6 --max-new-tokens 128 [--oracle] [--dtype fp32]
"""

import argparse

from cllm.data.datasets import load_dataset_prompts
from cllm.data.prompts import format_prompt
from cllm.decoding import gated as G
from cllm.decoding.ar import ar_decode
from cllm.decoding.options import GatedOptions
from cllm.models import ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter")
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--oracle", action="store_true", help="replace the next guess's first token by the true one")
    args = ap.parse_args()
    loaded = ModelSpec(adapter=args.adapter, dtype=args.dtype).load()
    model, tok = loaded.model, loaded.tokenizer
    truth: list[int] = []
    apply = G.GatedRun.apply

    def apply_oracle(self, *a, **k):
        out = apply(self, *a, **k)
        if len(self.generated) < len(truth):
            self.guess[0] = truth[len(self.generated)]
        return out

    if args.oracle:
        G.GatedRun.apply = apply_oracle
    opts = GatedOptions(block_size=4, lookup_tokens=5, pool_candidates=1, sampler_tokens=0)
    tokens = forwards = ones = 0
    for rec in load_dataset_prompts("gsm8k", "test", limit=args.limit):
        ids = format_prompt(tok, rec.prompt)
        truth[:] = ar_decode(model, tok, ids, max_new_tokens=args.max_new_tokens).token_ids
        res = G.gated_decode(model, tok, ids, opts, max_new_tokens=args.max_new_tokens)
        acc = res.accept_lengths
        tokens, forwards, ones = tokens + sum(acc), forwards + len(acc), ones + sum(a == 1 for a in acc)
        print(rec.index, f"{sum(acc) / len(acc):.3f}", "same as AR" if res.token_ids == truth else "differs")
    print(f"{'oracle' if args.oracle else 'draft'}: {tokens / forwards:.3f} tokens / forward, "
          f"{ones / forwards:.0%} of the forwards commit one token")


if __name__ == "__main__":
    main()
