"""`cllm decode`: decode prompts with one method, optionally against the AR baseline in the same process."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cllm.errors import CllmError

METHODS = ("ar", "jacobi")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder, HF id or .gguf file (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="optional PEFT adapter folder merged into --model")
    p.add_argument("--method", default="jacobi", choices=METHODS, help="decoder to run (default: %(default)s)")
    p.add_argument("--compare", default=None, choices=METHODS, help="also run this method on the same prompts, interleaved")
    src = p.add_argument_group("prompts (one of)")
    src.add_argument("--prompt", action="append", default=None, help="a prompt text (repeatable)")
    src.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="JSONL file, one prompt per line")
    src.add_argument("--prompt-field", default="prompt", help="field of --prompts holding the text (default: %(default)s)")
    src.add_argument("--dataset", default=None, help="gsm8k, spec_bench, mt_bench, vicuna_bench, sharegpt, spider, humaneval, code")
    src.add_argument("--split", default=None, help="dataset split where there are several (gsm8k: train|test, default test)")
    src.add_argument("--data-dir", default=None, help="dataset root (default: $CLLM_DATA_DIR or ../shared/data)")
    src.add_argument("--limit", type=int, default=None, help="number of prompts")
    src.add_argument("--offset", type=int, default=0, help="skip this many prompts first")
    p.add_argument("--block-size", type=int, default=16, help="Jacobi block size n (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per prompt, at most (default: %(default)s)")
    p.add_argument("--init", default="prompt", choices=("prompt", "repeat", "pad"), help="Jacobi initial guess (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="AR only: 0 = greedy (default), > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="AR sampling: keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="AR sampling: nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed for Jacobi initial guesses and sampling")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16", "fp64"), help="bf16 for speed, fp32 (or fp64) for exactness checks (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over the GPUs (accelerate)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per method (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="answers.jsonl", help="answers in Spec-Bench format (--compare method: answers.<method>.jsonl)")
    p.add_argument("--report", default=None, metavar="report.json", help="write the summary report here")
    p.add_argument("--quiet", action="store_true", help="no per-prompt output")


def validate(args) -> None:
    if args.block_size < 1:
        raise CllmError(f"--block-size must be >= 1, got {args.block_size}")
    if args.max_new_tokens < 1:
        raise CllmError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise CllmError(f"--batch-size must be >= 1, got {args.batch_size}")
    n_sources = sum(x is not None for x in (args.prompt, args.prompts, args.dataset))
    if n_sources != 1:
        raise CllmError("give exactly one of --prompt, --prompts FILE or --dataset NAME")
    if args.compare == args.method:
        raise CllmError(f"--compare {args.compare} is the method itself")
    from cllm.decoding.sampling import check_sampling_args

    check_sampling_args(args.temperature, args.top_k, args.top_p)


def load_records(args):
    from cllm.data import PromptRecord, load_dataset_prompts, load_prompt_file

    if args.prompt is not None:
        recs = [PromptRecord(id=str(i), prompt=t, dataset="cli") for i, t in enumerate(args.prompt)]
        for i, r in enumerate(recs):
            if not r.prompt.strip():
                raise CllmError(f"--prompt number {i + 1} is empty")
        return recs
    if args.prompts is not None:
        return load_prompt_file(args.prompts, args.prompt_field, args.limit, args.offset)
    return load_dataset_prompts(args.dataset, args.split, args.data_dir, args.limit, args.offset)


def decode_batch(method: str, model, tokenizer, prompt_ids: list[list[int]], args, seeds: list[int]):
    from cllm.decoding import ar_decode, jacobi_decode

    if method == "ar":
        return ar_decode(model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, seeds)
    return jacobi_decode(model, tokenizer, prompt_ids, args.block_size, args.max_new_tokens, args.init, seeds)


def run(args) -> None:
    from tqdm import tqdm

    from cllm import distributed
    from cllm.models import load_model
    from cllm.prompts import format_prompt
    from cllm.report import answer_line, build_report, format_table

    validate(args)
    records = load_records(args)
    ctx = distributed.setup()
    try:
        device = args.device or ctx.device()
        model, tokenizer = load_model(args.model, args.dtype, device, args.device_map, adapter=args.adapter)
        methods = [args.method] + ([args.compare] if args.compare else [])
        mine = ctx.shard(list(range(len(records))))
        prompt_ids = {i: format_prompt(tokenizer, records[i].prompt) for i in mine}

        if mine and args.warmup:  # untimed: first calls pay for allocation and kernel selection
            warm = [prompt_ids[mine[0]]]
            for _ in range(args.warmup):
                for m in methods:
                    decode_batch(m, model, tokenizer, warm, _short(args), [args.seed])

        rows: dict[str, list[dict]] = {m: [] for m in methods}
        seconds: dict[str, float] = {m: 0.0 for m in methods}
        batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
        bar = tqdm(total=len(mine), desc=f"decode {'+'.join(methods)}", unit="prompt", disable=not ctx.is_main)
        for b_no, idx in enumerate(batches):
            order = methods if b_no % 2 == 0 else methods[::-1]  # alternate so neither method always goes first
            for m in order:
                t0 = time.perf_counter()
                results = decode_batch(m, model, tokenizer, [prompt_ids[i] for i in idx], args, [args.seed + i for i in idx])
                seconds[m] += time.perf_counter() - t0
                for i, res in zip(idx, results):
                    rows[m].append(_row(i, records[i], res))
                    if m == args.method and args.prompt is not None and not args.quiet:
                        tqdm.write(f"--- prompt {records[i].id} ({m}):\n{res.text}")
            bar.update(len(idx))
        bar.close()

        gathered = distributed.gather_to_main(ctx, {"rows": rows, "seconds": seconds})
        if not ctx.is_main:
            return
        all_rows = {m: sorted((r for g in gathered for r in g["rows"][m]), key=lambda r: r["index"]) for m in methods}
        all_seconds = {m: sum(g["seconds"][m] for g in gathered) for m in methods}
        report = build_report(
            model=args.model,
            dtype=args.dtype,
            rows=all_rows,
            seconds=all_seconds,
            settings={
                "block_size": args.block_size,
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size,
                "init": args.init,
                "temperature": args.temperature,
                "world_size": ctx.world_size,
                "adapter": args.adapter,
            },
        )
        if args.out:
            for m in methods:
                path = Path(args.out) if m == args.method else _sibling(Path(args.out), m)
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    for r in all_rows[m]:
                        f.write(json.dumps(answer_line(r, f"{Path(str(args.model)).name}-{m}")) + "\n")
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(report))
    finally:
        distributed.teardown(ctx)


def _short(args):
    short = argparse.Namespace(**vars(args))
    short.max_new_tokens = min(args.max_new_tokens, 2 * args.block_size)
    return short


def _sibling(path: Path, method: str) -> Path:
    return path.with_name(f"{path.stem}.{method}{path.suffix or '.jsonl'}")


def _row(index: int, rec, res) -> dict:
    return {
        "index": index,
        "id": rec.id,
        "category": rec.category,
        "dataset": rec.dataset,
        "token_ids": res.token_ids,
        "text": res.text,
        "new_tokens": res.n_new_tokens,
        "forwards": res.n_forwards,
        "accept_lengths": res.accept_lengths,
        "fast_forward": res.n_fast_forward,
        "stationary": res.n_stationary,
        "wall_time": res.wall_time_s,
        "finish_reason": res.finish_reason,
    }
