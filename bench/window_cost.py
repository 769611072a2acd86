"""Cost of one decoding forward against its width: what a Jacobi window of W tokens and R rows costs next to a
1-token AR step, on top of a real prompt's KV cache, all shapes interleaved in one process.

    python bench/window_cost.py --dtype bf16 --widths 1,8,16,32,48 --rows 1,2,3 --reps 15

Prints the median milliseconds of each (W, R) and its ratio to the 1-token step: the tokens per forward a decoder
needs with that window just to break even with AR (multiply by the wanted speed-up for a goal).
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
    from cllm.decoding.common import SeqCache, cached_forward
    from cllm.models import load_model
    from cllm.data.prompts import format_prompt

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--widths", default="1,8,16,32,48")
    p.add_argument("--rows", default="1,2,3")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)

    model, tok = load_model(args.model, args.dtype)
    ids = format_prompt(tok, load_dataset_prompts("gsm8k", limit=1)[0].prompt)
    shapes = [(w, r) for w in map(int, args.widths.split(",")) for r in map(int, args.rows.split(","))]
    shapes = sorted(set(shapes) | {(1, 1)})  # the 1-token step is the unit
    times: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
    rng = random.Random(0)
    with torch.inference_mode():
        cache = SeqCache(model)
        cache.forward(ids)  # the prompt's KV, as after a prefill
        n = cache.n
        for _ in range(args.reps + 1):  # the first round warms up, untimed
            order = list(shapes)
            rng.shuffle(order)  # no shape always runs first
            for w, r in order:
                x = torch.randint(100, 20000, (r, w))  # (R, W) token ids
                saved = [(layer.keys, layer.values) for layer in cache.cache.layers]
                if r > 1:
                    cache.cache.batch_repeat_interleave(r)
                t0 = time.perf_counter()
                cached_forward(model, x, torch.arange(n, n + w).expand(r, -1), cache.cache)
                dt = time.perf_counter() - t0
                for layer, (k, v) in zip(cache.cache.layers, saved):  # back to the prompt's cache
                    layer.keys, layer.values = k, v
                if _ > 0:
                    times[(w, r)].append(dt)
    base = statistics.median(times[(1, 1)])
    table = [{"width": w, "rows": r, "ms": 1000 * statistics.median(t), "ratio_to_1_token": statistics.median(t) / base,
              "ms_iqr": 1000 * (statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0])}
             for (w, r), t in sorted(times.items())]
    print(f"{args.model} {args.dtype}, prompt {len(ids)} tokens, torch threads {torch.get_num_threads()}, "
          f"median of {args.reps}")
    print("| width W | rows R | ms (IQR) | x 1-token step |\n|---|---|---|---|")
    for row in table:
        print(f"| {row['width']} | {row['rows']} | {row['ms']:.1f} ({row['ms_iqr']:.1f}) | {row['ratio_to_1_token']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "prompt_tokens": len(ids),
                       "threads": torch.get_num_threads(), "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
