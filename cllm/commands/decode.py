"""`cllm decode`: decode prompts with one method, optionally against the AR baseline in the same process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cllm.decoding import registry
from cllm.errors import CllmError
from cllm.fileio import method_file_stem
from cllm.models import DEFAULT_MODEL

YAML_DEFAULTS = True  # --config FILE.yaml: flags by name (block_size: 8), the command line over them


def add_arguments(p: argparse.ArgumentParser) -> None:
    methods = registry.names()
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML of these flags by name (max_new_tokens: 128, compare: ar); flags override it")
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder, HF id or .gguf file (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="optional PEFT adapter folder merged into --model")
    p.add_argument("--method", default="jacobi", choices=methods, help="decoder to run (default: %(default)s)")
    p.add_argument("--compare", default=None, metavar="M[,M...]",
                   help=f"also run these methods ({', '.join(methods)}) on the same prompts, interleaved; a method "
                        "with options of its own is NAME:OPTION=VALUE..., e.g. mtad:tau=0.3:beam_width=2")
    p.add_argument("--draft", default=None, help="sps/mtad: draft model (same vocabulary), e.g. a train-draft output")
    registry.add_arguments(p)
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
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for Jacobi initial guesses and sampling")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16", "fp64"),
                   help="auto: the fast dtype here (bf16 on CUDA or a CPU with AVX512_BF16/AMX, else fp32); fp32 "
                        "(or fp64) for exactness checks (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over the GPUs (accelerate)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per method (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="answers.jsonl", help="answers in Spec-Bench format (--compare method: answers.<method>.jsonl)")
    p.add_argument("--report", default=None, metavar="report.json", help="write the summary report here")
    p.add_argument("--no-perplexity", action="store_true", help="skip scoring outputs under the target (untimed)")
    p.add_argument("--quiet", action="store_true", help="no per-prompt output")


def validate(args) -> "registry.DecodeConfig":
    """Check the flags before any model is loaded; returns the decoding config."""
    if args.batch_size < 1:
        raise CllmError(f"--batch-size must be >= 1, got {args.batch_size}")
    n_sources = sum(x is not None for x in (args.prompt, args.prompts, args.dataset))
    if n_sources != 1:
        raise CllmError("give exactly one of --prompt, --prompts FILE or --dataset NAME")
    cfg = registry.DecodeConfig.from_args(args)
    cfg.validate(method_list(args), args.batch_size, has_draft=bool(args.draft))
    from cllm.models import ModelSpec

    ModelSpec(args.model, args.adapter, draft=args.draft).check()
    for flag, path in (("--out", args.out), ("--report", args.report)):
        if path:
            check_output_file(path, flag)
    return cfg


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any decoding, an output path that could not be written at the end: a folder, a parent that
    is a file, or a folder this user cannot write to."""
    import os

    p = Path(path)
    if p.is_dir():
        raise CllmError(f"{flag}: {path} is a folder; give a file name")
    parent = next((q for q in [p.parent, *p.parent.parents] if q.exists()), Path("."))
    if not parent.is_dir():
        raise CllmError(f"{flag}: {parent} is a file, so {path} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CllmError(f"{flag}: cannot write under {parent} (permission denied)")


def method_list(args) -> list[str]:
    """--method first, then the --compare methods (comma-separated), each once."""
    compare = [m.strip() for m in args.compare.split(",") if m.strip()] if args.compare else []
    for m in compare:
        if not registry.known(m):
            raise CllmError(f"--compare: unknown method {m!r}; choose from {', '.join(registry.names())} "
                            "(or NAME:OPTION=VALUE...)")
        if m == args.method:
            raise CllmError(f"--compare {m} is the method itself")
    if len(set(compare)) != len(compare):
        raise CllmError(f"--compare lists a method twice: {args.compare}")
    return [args.method, *compare]


def run(args) -> None:
    from cllm import distributed
    from cllm.data.datasets import load_records
    from cllm.eval.report import format_table

    cfg = validate(args)
    records = load_records(args)
    ctx = distributed.setup()
    try:
        methods = method_list(args)
        loaded = _spec(args, ctx.device() if args.device is None else args.device, methods).load()
        model, tokenizer, draft = loaded.model, loaded.tokenizer, loaded.draft
        args.dtype_requested, args.dtype = args.dtype, loaded.spec.dtype  # both in the report
        mine = ctx.shard(list(range(len(records))))
        prompt_ids = _prompt_ids(model, tokenizer, records, mine, cfg.max_new_tokens)
        if mine and args.warmup:  # untimed: first calls pay for allocation and kernel selection
            short = cfg.replace(max_new_tokens=min(cfg.max_new_tokens, 32))
            for _ in range(args.warmup):
                for m in methods:
                    registry.decode(m, model, tokenizer, [prompt_ids[mine[0]]], [args.seed], short, draft)
        # One process streams each answer to --out as it is decoded; ranks send theirs to rank 0 at the end.
        answers = _AnswerFiles(args, methods) if args.out and ctx.world_size == 1 else None
        try:
            measured = _decode_interleaved(args, cfg, ctx, methods, records, prompt_ids, (model, tokenizer, draft),
                                           answers)
        finally:
            if answers:
                answers.close()
        gathered = distributed.gather_to_main(ctx, measured)
        if not ctx.is_main:
            return
        report, all_rows = _report(args, cfg, ctx, methods, gathered)
        if args.out and answers is None:
            _AnswerFiles(args, methods).write_all(all_rows)
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(report))
    finally:
        distributed.teardown(ctx)


def _spec(args, device: str, methods: list[str]):
    """The models to load: a draft only where a method drafts."""
    from cllm.models import ModelSpec

    draft = args.draft if any(registry.get(m).needs_draft for m in methods) else None
    return ModelSpec(args.model, args.adapter, args.dtype, device, draft, args.device_map)


def _prompt_ids(model, tokenizer, records, mine: list[int], max_new_tokens: int) -> dict[int, list[int]]:
    """This rank's prompts as chat-formatted token ids, each checked to fit the context with its new tokens."""
    from cllm.data.prompts import check_fits_context, format_prompt

    prompt_ids = {i: format_prompt(tokenizer, records[i].prompt) for i in mine}
    check_fits_context(model, {records[i].id: ids for i, ids in prompt_ids.items()}, max_new_tokens)
    return prompt_ids


def _decode_interleaved(args, cfg, ctx, methods, records, prompt_ids, models, answers) -> list[dict]:
    """Every method on every batch of this rank's prompts, in the measuring harness of `cllm eval`
    (`cllm.eval.measure`): the order rotated per batch, one timed call per batch and method, one row per prompt."""
    from tqdm import tqdm

    from cllm.eval.measure import rotated, rows_of, stamp, timed

    model, tokenizer, draft = models
    mine, marks, rows = list(prompt_ids), stamp(), []
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    bar = tqdm(total=len(mine), desc=f"decode {'+'.join(methods)}", unit="prompt", disable=not ctx.is_main)
    for b_no, idx in enumerate(batches):
        for m in rotated(methods, b_no):
            results, timing = timed(lambda: registry.decode(m, model, tokenizer, [prompt_ids[i] for i in idx],
                                                            [args.seed + i for i in idx], cfg, draft))
            for row in rows_of(m, [(i, records[i]) for i in idx], results, timing, marks):
                rows.append(_scored(args, model, records[row["index"]], prompt_ids[row["index"]], row))
                if answers:
                    answers.write(m, row)
                if m == args.method and args.prompt is not None and not args.quiet:
                    tqdm.write(f"--- prompt {row['id']} ({m}):\n{row['text']}")
        bar.update(len(idx))
    bar.close()
    return rows


def _scored(args, model, rec, ids: list[int], row: dict) -> dict:
    """The untimed quality fields: log-probabilities under the model that decoded (unwarped; skipped with
    --no-perplexity), correctness where the prompt's source tells (generated code is not run here: `cllm eval`
    runs it in the sandbox), loops."""
    from cllm.eval.measure import add_quality
    from cllm.eval.metrics import token_logprobs
    from cllm.eval.summary import score

    logprobs = None if args.no_perplexity else token_logprobs(model, ids, row["token_ids"])
    correct = None if rec.dataset == "humaneval" else score(rec, row["text"])
    return add_quality(row, logprobs, correct)


def _report(args, cfg, ctx, methods: list[str], gathered: list[list[dict]]) -> tuple[dict, dict]:
    """(the report, every rank's rows per method in prompt order): `cllm eval`'s report, against `ar`."""
    from cllm.eval.summary import build_eval_report

    rows = {m: sorted((r for g in gathered for r in g if r["method"] == m), key=lambda r: r["index"])
            for m in methods}
    settings = {"model": args.model, "dtype": args.dtype, "dtype_requested": args.dtype_requested,
                "max_new_tokens": cfg.max_new_tokens, "batch_size": args.batch_size, "world_size": ctx.world_size,
                "adapter": args.adapter, "seed": args.seed, "draft": args.draft,
                "temperature": cfg.options.get("temperature", 0.0), **cfg.options,
                "method_options": {m: cfg.settings(m) for m in methods}}
    report = build_eval_report(rows, settings, reference="ar")
    report["n_prompts"] = max((len(v) for v in rows.values()), default=0)
    # the per-prompt figures (`cllm eval` keeps them in rows-rank*.jsonl; decode has no folder of its own)
    report["rows"] = {m: [{k: v for k, v in r.items() if k not in ("token_ids", "text")} for r in mrows]
                      for m, mrows in rows.items()}
    if settings["method_options"].get("ar", {}).get("temperature", 0.0) > 0:  # sampled: no identity claim
        for stats in report["methods"].values():
            stats.pop("exact_match_ar", None), stats.pop("not_identical_ids", None)
    return report, rows


class _AnswerFiles:
    """Answers in Spec-Bench format: --out for --method, answers.<method>.jsonl beside it for each --compare one."""

    def __init__(self, args, methods: list[str]):
        self.model_id = Path(str(args.model)).name
        self.paths = {m: Path(args.out) if m == args.method else _sibling(Path(args.out), m) for m in methods}
        self.files = {}

    def write(self, method: str, row: dict) -> None:
        from cllm.eval.report import answer_line

        if method not in self.files:
            self.paths[method].parent.mkdir(parents=True, exist_ok=True)
            self.files[method] = open(self.paths[method], "w", encoding="utf-8")
        f = self.files[method]
        f.write(json.dumps(answer_line(row, f"{self.model_id}-{method}")) + "\n")
        f.flush()

    def write_all(self, rows: dict[str, list[dict]]) -> None:
        for m, mrows in rows.items():
            for r in mrows:
                self.write(m, r)
        self.close()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _sibling(path: Path, method: str) -> Path:
    return path.with_name(f"{path.stem}.{method_file_stem(method)}{path.suffix or '.jsonl'}")
