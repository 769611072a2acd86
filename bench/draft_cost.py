"""What a draft costs per token next to its target: one-token forwards on a prompt's KV cache, interleaved, for the
target, a draft of L layers cut out of it with its full 49k-row LM head, and the same draft with the head cut to
the K most frequent tokens of GSM8K answers (`PrunedVocabDraft`).

    python bench/draft_cost.py --dtype fp32 --layers 4 --vocab 4096 --reps 30 --out docs/results/draft_cost.json

Prints the median milliseconds of each and its ratio to the target's step: the share of a target step that
drafting one token costs (SpS pays gamma of them per verification).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def main(argv=None) -> int:
    from cllm.data.datasets import load_dataset_prompts
    from cllm.data.prompts import format_prompt
    from cllm.decoding.common import SeqCache
    from cllm.decoding.pruned_draft import PrunedVocabDraft, frequent_tokens
    from cllm.models import load_model
    from cllm.training.draft import build_draft, spread_layers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="fp32", choices=("bf16", "fp32"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096, help="K, the pruned head's rows")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    target, tok = load_model(args.model, args.dtype)
    draft = build_draft(target, spread_layers(target.config.num_hidden_layers, args.layers))
    answers = [tok(r.answer)["input_ids"] for r in load_dataset_prompts("gsm8k", "train", limit=2000)]
    keep = frequent_tokens(answers, args.vocab, always=[tok.eos_token_id])
    models = {"target": target, f"draft {args.layers}L": draft,
              f"draft {args.layers}L, head {len(keep)}": PrunedVocabDraft(draft, keep)}
    ids = format_prompt(tok, load_dataset_prompts("gsm8k", "test", limit=1)[0].prompt)
    caches = {name: SeqCache(m) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    rng = random.Random(0)
    with torch.inference_mode():
        for c in caches.values():
            c.forward(ids)
        for rep in range(args.reps + 1):  # the first round warms up, untimed
            order = list(models)
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                caches[name].forward([int(torch.randint(100, 20000, ()))])
                if rep:
                    times[name].append(time.perf_counter() - t0)
                caches[name].crop(len(ids))
    base = statistics.median(times["target"])
    table = [{"model": name, "ms": 1000 * statistics.median(t), "ratio_to_target": statistics.median(t) / base}
             for name, t in times.items()]
    print(f"{args.model} {args.dtype}, torch threads {torch.get_num_threads()}, median of {args.reps}")
    print("| model | ms per token | x target |\n|---|---|---|")
    for row in table:
        print(f"| {row['model']} | {row['ms']:.1f} | {row['ratio_to_target']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                       "vocab_kept": len(keep), "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
