"""Cost of one CLLM training step against one plain SFT step on the same examples, interleaved in one process.

    python bench/train_step_cost.py --data runs/trajectories/gsm8k50 --steps 12

CLLM step: the packed consistency + AR objective (`CllmTrainer.compute_loss`), forward + backward + AdamW step.
SFT step: causal-LM cross-entropy on [context][fixed point] of the same records, forward + backward + AdamW step.
Both full fine-tuning in fp32 (or --bf16 autocast), batch 1. Prints the median seconds of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
import sys
import time

import torch


def main(argv=None) -> int:
    from cllm.training.losses import ar_loss
    from cllm.models import load_model
    from cllm.training.objectives.cllm import PackedCollator, TrajectoryDataset
    from cllm.training.records import read_records
    from cllm.training.losses import LossSettings
    from cllm.training.trainer import CllmTrainer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model, tok = load_model(args.model, "fp32")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    records = read_records(args.data)
    ds = TrajectoryDataset(records)
    collate = PackedCollator(tok.pad_token_id, args.block_size)
    settings = LossSettings()
    # compute_loss needs only the settings and the trainer state; call it unbound on a minimal stand-in.
    stub = argparse.Namespace(loss_settings=settings, _window=None, _metrics=defaultdict(list),
                              state=argparse.Namespace(global_step=0))

    def cllm_step(ex):
        batch = collate([ex])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = CllmTrainer.compute_loss(stub, model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sft_step(ex):
        ids = torch.tensor([ex["prompt_ids"] + ex["fixed_point"]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            target = ids[:, 1:]
            mask = torch.zeros_like(target, dtype=torch.bool)
            mask[:, len(ex["prompt_ids"]) - 1 :] = True
            loss = ar_loss(logits, target, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {"cllm": [], "sft": []}
    for i in range(args.steps + 2):
        ex = ds[i % len(ds)]
        order = [("cllm", cllm_step), ("sft", sft_step)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn(ex)
            if i >= 2:  # the first two rounds are warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "bf16": args.bf16, "steps": args.steps, "median_s": med,
              "ratio_cllm_over_sft": med["cllm"] / med["sft"],
              "spread_s": {k: [round(min(v), 3), round(max(v), 3)] for k, v in times.items()}}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
