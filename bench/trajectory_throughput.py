"""Trajectory-collection throughput: cllm's generator against the naive reference method, in one process.

    python bench/trajectory_throughput.py --model smollm2-135m --limit 8 --max-new-tokens 128 --batch-size 8

Naive reference (as in the CLLM reference code): batch 1, no KV cache; each iteration recomputes the whole
prefix (prompt + earlier blocks + current guess) and a block ends when the state stops changing. cllm: the
shared KV-cached `jacobi_decode(record_trajectory=True)` on batches of prompts (what `cllm gen` runs, minus the
file writes). Rate = fixed-point tokens per second. Both use the same prompts, dtype and initial guesses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


@torch.inference_mode()
def naive_trajectories(model, prompt: list[int], n: int, max_new_tokens: int, eos: int, gen: torch.Generator):
    """Reference method: full recompute per Jacobi iteration, batch 1. Returns (tokens, forwards)."""
    generated: list[int] = []
    forwards = 0
    while len(generated) < max_new_tokens:
        ctx = prompt + generated
        idx = torch.randint(len(prompt), (n,), generator=gen)
        state = [prompt[i] for i in idx.tolist()]
        for _ in range(n + 1):
            logits = model(torch.tensor([ctx + state[:-1]])).logits[0, len(ctx) - 1 :]  # (n, V)
            forwards += 1
            new = logits.argmax(-1).tolist()
            if new == state:
                break
            state = new
        generated.extend(state)
        if eos in state:
            generated = generated[: len(generated) - len(state) + state.index(eos) + 1]
            break
    return generated, forwards


def main(argv=None) -> int:
    from cllm.data.datasets import load_dataset_prompts
    from cllm.decoding import jacobi_decode
    from cllm.decoding.options import JacobiOptions
    from cllm.models import load_model
    from cllm.data.prompts import format_prompt

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)

    model, tok = load_model(args.model, args.dtype)
    recs = load_dataset_prompts(args.dataset, args.split, limit=args.limit)
    prompts = [format_prompt(tok, r.prompt) for r in recs]
    eos = tok.eos_token_id

    jacobi_decode(model, tok, prompts[:1], JacobiOptions(block_size=args.block_size),
                  max_new_tokens=args.block_size)  # warm-up, untimed
    t0 = time.perf_counter()
    ours = []
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i : i + args.batch_size]
        opts = JacobiOptions(block_size=args.block_size, record_trajectory=True)
        ours += jacobi_decode(model, tok, batch, opts, max_new_tokens=args.max_new_tokens,
                              seed=list(range(i, i + len(batch))))
    t_ours = time.perf_counter() - t0
    tokens_ours = sum(r.n_new_tokens for r in ours)

    t0 = time.perf_counter()
    naive_tokens, naive_forwards, same = 0, 0, 0
    for i, (prompt, res) in enumerate(zip(prompts, ours)):
        out, fwd = naive_trajectories(model, prompt, args.block_size, args.max_new_tokens, eos,
                                      torch.Generator().manual_seed(i))
        naive_tokens += len(out)
        naive_forwards += fwd
        same += out == res.token_ids
        print(f"  naive prompt {i + 1}/{len(prompts)}: {len(out)} tokens, {fwd} forwards", file=sys.stderr)
    t_naive = time.perf_counter() - t0

    result = {
        "model": args.model, "dtype": args.dtype, "n_prompts": len(prompts), "block_size": args.block_size,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "cllm": {"tokens": tokens_ours, "seconds": round(t_ours, 2), "tokens_per_second": tokens_ours / t_ours,
                 "forwards_per_prompt": statistics.mean(r.n_forwards for r in ours)},
        "naive": {"tokens": naive_tokens, "seconds": round(t_naive, 2), "tokens_per_second": naive_tokens / t_naive,
                  "forwards_per_prompt": naive_forwards / len(prompts)},
        "same_output_prompts": same,
    }
    result["speedup"] = result["cllm"]["tokens_per_second"] / result["naive"]["tokens_per_second"]
    print(json.dumps(result, indent=2))
    print(f"cllm {result['cllm']['tokens_per_second']:.1f} tok/s vs naive {result['naive']['tokens_per_second']:.1f} "
          f"tok/s: {result['speedup']:.1f}x ({same}/{len(prompts)} prompts token-identical)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
