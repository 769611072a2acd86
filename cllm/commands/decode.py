"""`cllm decode`: decode prompts with one method, optionally against the AR baseline in the same process."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cllm.errors import CllmError

METHODS = ("ar", "jacobi", "multiblock", "sps", "mtad")
DRAFT_METHODS = ("sps", "mtad")
SINGLE_PROMPT_METHODS = ("multiblock", "sps", "mtad")


def add_multiblock_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the multi-block Jacobi decoder (shared by `cllm decode` and `cllm eval`)."""
    p.add_argument("--n-blocks", type=int, default=2, help="multiblock: blocks in flight K (default: %(default)s)")
    p.add_argument("--spawn-ratio", type=float, default=0.85, help="multiblock: a new block enters once the newest "
                   "has this share r of its n tokens accepted (default: %(default)s)")
    p.add_argument("--n-recycle", type=int, default=2, help="multiblock: rejected tails verified as extra rows "
                   "per forward, 0 = off (default: %(default)s)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder, HF id or .gguf file (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="optional PEFT adapter folder merged into --model")
    p.add_argument("--method", default="jacobi", choices=METHODS, help="decoder to run (default: %(default)s)")
    p.add_argument("--compare", default=None, metavar="M[,M...]",
                   help=f"also run these methods ({', '.join(METHODS)}) on the same prompts, interleaved")
    p.add_argument("--draft", default=None, help="sps/mtad: draft model (same vocabulary), e.g. a train-draft output")
    p.add_argument("--gamma", type=int, default=4, help="sps/mtad: draft tokens per iteration (default: %(default)s)")
    p.add_argument("--adaptive-gamma", action="store_true", help="sps: +2 after a fully accepted round, -1 otherwise")
    p.add_argument("--beam-width", type=int, default=4, help="mtad: beams of the draft's beam sampling (default: %(default)s)")
    p.add_argument("--beam-replacement", action="store_true", help="mtad: draw beams with replacement")
    p.add_argument("--tau", type=float, default=0.5, help="mtad: acceptance threshold on P/Q, > 0 (default: %(default)s)")
    add_multiblock_arguments(p)
    src = p.add_argument_group("prompts (one of)")
    src.add_argument("--prompt", action="append", default=None, help="a prompt text (repeatable)")
    src.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="JSONL file, one prompt per line")
    src.add_argument("--prompt-field", default="prompt", help="field of --prompts holding the text (default: %(default)s)")
    src.add_argument("--dataset", default=None, help="gsm8k, spec_bench, mt_bench, vicuna_bench, sharegpt, spider, humaneval, "
                     "code; several comma-separated (--limit and --offset then apply to each)")
    src.add_argument("--spread", action="store_true", help="take --limit prompts evenly spaced over the dataset "
                     "(all categories) instead of the first ones")
    src.add_argument("--split", default=None, help="dataset split where there are several (gsm8k: train|test, default test)")
    src.add_argument("--data-dir", default=None, help="dataset root (default: $CLLM_DATA_DIR or ../shared/data)")
    src.add_argument("--limit", type=int, default=None, help="number of prompts (per dataset)")
    src.add_argument("--offset", type=int, default=0, help="skip this many prompts first")
    p.add_argument("--block-size", type=int, default=16, help="Jacobi block size n (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per prompt, at most (default: %(default)s)")
    p.add_argument("--init", default="prompt", choices=("prompt", "repeat", "pad"), help="Jacobi initial guess (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="ar/sps/mtad: 0 = greedy (default), > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sampling: keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sampling: nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed for Jacobi initial guesses and sampling")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16", "fp64"), help="bf16 for speed, fp32 (or fp64) for exactness checks (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over the GPUs (accelerate)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per method (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="answers.jsonl", help="answers in Spec-Bench format (--compare method: answers.<method>.jsonl)")
    p.add_argument("--report", default=None, metavar="report.json", help="write the summary report here")
    p.add_argument("--no-perplexity", action="store_true", help="skip scoring outputs under the target (untimed)")
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
    methods = method_list(args)
    from cllm.decoding.mtad import check_mtad_args
    from cllm.decoding.sampling import check_sampling_args
    from cllm.decoding.speculative import check_draft_args

    check_sampling_args(args.temperature, args.top_k, args.top_p)
    uses_draft = [m for m in methods if m in DRAFT_METHODS]
    single = [m for m in methods if m in SINGLE_PROMPT_METHODS]
    if single and args.batch_size != 1:
        raise CllmError(f"{single[0]} decodes one prompt at a time: use --batch-size 1")
    if uses_draft:
        if not args.draft:
            raise CllmError(f"--method/--compare {uses_draft[0]} needs --draft MODEL")
        check_draft_args(args.gamma)
    if "multiblock" in methods:
        from cllm.decoding.multiblock import check_multiblock_args

        check_multiblock_args(args.block_size, args.n_blocks, args.spawn_ratio, args.n_recycle)
    if "mtad" in methods:
        check_mtad_args(args.tau, args.beam_width, args.temperature)


def load_records(args):
    from cllm.data import PromptRecord, load_dataset_mix, load_prompt_file

    if args.prompt is not None:
        recs = [PromptRecord(id=str(i), prompt=t, dataset="cli") for i, t in enumerate(args.prompt)]
        for i, r in enumerate(recs):
            if not r.prompt.strip():
                raise CllmError(f"--prompt number {i + 1} is empty")
        return recs
    if args.prompts is not None:
        return load_prompt_file(args.prompts, args.prompt_field, args.limit, args.offset)
    return load_dataset_mix(args.dataset, args.split, args.data_dir, args.limit, args.offset, args.spread)


def method_list(args) -> list[str]:
    """--method first, then the --compare methods (comma-separated), each once."""
    compare = [m.strip() for m in args.compare.split(",") if m.strip()] if args.compare else []
    for m in compare:
        if m not in METHODS:
            raise CllmError(f"--compare: unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m == args.method:
            raise CllmError(f"--compare {m} is the method itself")
    if len(set(compare)) != len(compare):
        raise CllmError(f"--compare lists a method twice: {args.compare}")
    return [args.method, *compare]


def decode_batch(method: str, model, tokenizer, prompt_ids: list[list[int]], args, seeds: list[int], draft=None):
    from cllm.decoding import ar_decode, jacobi_decode, mtad_decode, multiblock_decode, speculative_decode

    if method == "ar":
        return ar_decode(model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, seeds)
    if method == "jacobi":
        return jacobi_decode(model, tokenizer, prompt_ids, args.block_size, args.max_new_tokens, args.init, seeds)
    if method == "multiblock":
        return [multiblock_decode(model, tokenizer, p, args.block_size, args.max_new_tokens, args.n_blocks,
                                  args.spawn_ratio, args.n_recycle, args.init, s) for p, s in zip(prompt_ids, seeds)]
    if method == "sps":
        return [speculative_decode(model, draft, tokenizer, p, args.max_new_tokens, args.gamma, args.adaptive_gamma,
                                   args.temperature, args.top_k, args.top_p, s) for p, s in zip(prompt_ids, seeds)]
    return [mtad_decode(model, draft, tokenizer, p, args.max_new_tokens, args.gamma, args.beam_width, args.tau,
                        args.temperature, args.top_k, args.top_p, s, args.beam_replacement)
            for p, s in zip(prompt_ids, seeds)]


def run(args) -> None:
    from tqdm import tqdm

    from cllm import distributed
    from cllm.energy import EnergyMeter
    from cllm.metrics import token_logprobs
    from cllm.models import load_model
    from cllm.prompts import format_prompt
    from cllm.report import answer_line, build_report, format_table

    validate(args)
    records = load_records(args)
    ctx = distributed.setup()
    try:
        device = args.device or ctx.device()
        model, tokenizer = load_model(args.model, args.dtype, device, args.device_map, adapter=args.adapter)
        methods = method_list(args)
        draft = None
        if any(m in DRAFT_METHODS for m in methods):
            from cllm.draft import check_draft_compatible

            draft, draft_tokenizer = load_model(args.draft, args.dtype, device, args.device_map)
            check_draft_compatible(model, tokenizer, draft, draft_tokenizer)
        mine = ctx.shard(list(range(len(records))))
        prompt_ids = {i: format_prompt(tokenizer, records[i].prompt) for i in mine}

        if mine and args.warmup:  # untimed: first calls pay for allocation and kernel selection
            warm = [prompt_ids[mine[0]]]
            for _ in range(args.warmup):
                for m in methods:
                    decode_batch(m, model, tokenizer, warm, _short(args), [args.seed], draft)

        rows: dict[str, list[dict]] = {m: [] for m in methods}
        seconds: dict[str, float] = {m: 0.0 for m in methods}
        meters = {m: EnergyMeter() for m in methods}
        batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
        bar = tqdm(total=len(mine), desc=f"decode {'+'.join(methods)}", unit="prompt", disable=not ctx.is_main)
        for b_no, idx in enumerate(batches):
            k = b_no % len(methods)
            order = methods[k:] + methods[:k]  # rotate so that no method always goes first
            for m in order:
                meters[m].start()
                t0 = time.perf_counter()
                results = decode_batch(m, model, tokenizer, [prompt_ids[i] for i in idx], args,
                                       [args.seed + i for i in idx], draft)
                seconds[m] += time.perf_counter() - t0
                meters[m].stop()
                for i, res in zip(idx, results):
                    row = _row(i, records[i], res)
                    if not args.no_perplexity:  # untimed: the output scored under the unwarped target
                        row["logprobs"] = token_logprobs(model, prompt_ids[i], res.token_ids)
                    rows[m].append(row)
                    if m == args.method and args.prompt is not None and not args.quiet:
                        tqdm.write(f"--- prompt {records[i].id} ({m}):\n{res.text}")
            bar.update(len(idx))
        bar.close()

        joules = {m: meters[m].joules for m in methods}
        gathered = distributed.gather_to_main(ctx, {"rows": rows, "seconds": seconds, "joules": joules})
        if not ctx.is_main:
            return
        all_rows = {m: sorted((r for g in gathered for r in g["rows"][m]), key=lambda r: r["index"]) for m in methods}
        all_seconds = {m: sum(g["seconds"][m] for g in gathered) for m in methods}
        all_joules = {m: None if any(g["joules"][m] is None for g in gathered) else sum(g["joules"][m] for g in gathered)
                      for m in methods}
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
                "top_k": args.top_k,
                "top_p": args.top_p,
                "seed": args.seed,
                **({"draft": args.draft, "gamma": args.gamma, "adaptive_gamma": args.adaptive_gamma}
                   if draft is not None else {}),
                **({"beam_width": args.beam_width, "tau": args.tau, "beam_replacement": args.beam_replacement}
                   if "mtad" in methods else {}),
            },
            joules=all_joules,
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
        **{k: res.extra[k] for k in ("iterations", "drafted", "accepted", "draft_forwards") if k in res.extra},
    }
