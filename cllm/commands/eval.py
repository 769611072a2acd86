"""`cllm eval` / `decode/evaluate.py`: how much faster is a checkpoint, did quality drop, where does the speed come from.

Every method runs on the same prompts, interleaved prompt by prompt (rotating order), together with AR greedy of the
BASE model (`base_ar`, the speed reference) in the same process. Rows are appended per prompt (fsynced), so an
interrupted eval resumes without redoing finished prompts; under torchrun each rank takes a disjoint share and
rank 0 writes report.json, summary.md, answers/<method>.jsonl and the plots.

A finished eval can be extended with more methods (the same command with a longer --methods/--base-methods list)
or more prompts (a larger --limit): only the new (prompt, method) pairs run, and every row records its run so the
report flags speed-ups that compare two runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from cllm.decoding import registry
from cllm.errors import CllmError
from cllm.eval.harness import REFERENCE

SETTINGS_KEYS = ("model", "adapter", "base_model", "methods", "base_methods", "dataset", "prompts", "prompt_field", "split", "limit",
                 "offset", "spread", "block_size", "max_new_tokens", "init", "dtype", "temperature", "top_k", "top_p",
                 "seed", "draft", "gamma", "adaptive_gamma", "beam_width", "tau", "beam_replacement",
                 "n_blocks", "spawn_ratio", "n_recycle")


def new_run_id() -> str:
    """A label for one eval run's rows. Time and pid alone collide when one process runs two evals within a
    second (main() called twice, as tests do), which would let the report call rows of two runs one run."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    methods = registry.names()
    p.add_argument("--model", default="smollm2-135m", help="checkpoint to evaluate: alias, folder, HF id, .gguf")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder merged into --model")
    p.add_argument("--base-model", default=None, help="the speed and quality reference (default: --model without "
                   "the adapter); AR greedy of it runs as base_ar")
    p.add_argument("--methods", default="ar,jacobi", help=f"comma-separated, from {', '.join(methods)} "
                   "(default: %(default)s)")
    p.add_argument("--base-methods", default="", help="also run these methods on the base model (as base_<method>), "
                   "e.g. jacobi for a base-vs-trained table in one run")
    src = p.add_argument_group("prompts (one of)")
    src.add_argument("--dataset", default=None, help="dataset name(s), comma-separated (gsm8k, spider, humaneval, ...)")
    src.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="JSONL prompts; an `answer` field is scored")
    src.add_argument("--prompt-field", default="prompt", help="field of --prompts holding the text")
    src.add_argument("--split", default=None, help="dataset split (gsm8k: test by default)")
    src.add_argument("--data-dir", default=None, help="dataset root (default: $CLLM_DATA_DIR or ../shared/data)")
    src.add_argument("--limit", type=int, default=None, help="prompts (per dataset)")
    src.add_argument("--offset", type=int, default=0, help="skip this many prompts first")
    src.add_argument("--spread", action="store_true", help="--limit prompts evenly spaced over each dataset")
    registry.add_arguments(p)  # the decoding settings; --temperature applies to the checkpoint's methods
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16", "fp64"), help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--draft", default=None, help="sps/mtad: draft model")
    p.add_argument("--seed", type=int, default=0, help="seed of initial guesses and sampling")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per method (default: %(default)s)")
    p.add_argument("--humaneval-timeout", type=float, default=10.0, help="seconds per HumanEval test run")
    p.add_argument("--out-dir", default=None, help="report.json, summary.md, answers/, plots (required)")
    p.add_argument("--training-log", default=None, metavar="DIR", help="also plot the loss curves of this training "
                   "output folder")
    p.add_argument("--overwrite", action="store_true", help="discard finished rows of a different earlier eval")


def _parse_methods(flag: str, value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    for m in methods:
        if m not in registry.names():
            raise CllmError(f"{flag}: unknown method {m!r}; choose from {', '.join(registry.names())}")
    if len(set(methods)) != len(methods):
        raise CllmError(f"{flag} lists a method twice: {value}")
    return methods


def method_names(args) -> list[str]:
    """Every method of the run: base_ar (the reference), base_<m> for --base-methods, then --methods."""
    methods = _parse_methods("--methods", args.methods)
    if not methods:
        raise CllmError("--methods is empty")
    base_methods = [m for m in _parse_methods("--base-methods", args.base_methods or "") if m != "ar"]
    if any(registry.get(m).needs_draft for m in methods + base_methods) and not args.draft:
        raise CllmError("sps/mtad need --draft MODEL")
    return [REFERENCE, *[f"base_{m}" for m in base_methods], *methods]


def validate(args) -> list[str]:
    if not args.out_dir:
        raise CllmError("--out-dir is required")
    if sum(x is not None for x in (args.dataset, args.prompts)) != 1:
        raise CllmError("give exactly one of --dataset NAME or --prompts FILE")
    methods = method_names(args)
    registry.DecodeConfig.from_args(args).validate([m.removeprefix("base_") for m in methods])
    from cllm.models import check_model_spec  # before the manifest: a typo must not block the corrected rerun

    check_model_spec(args.model, "--model", args.adapter)
    for flag, spec in (("--base-model", args.base_model), ("--draft", args.draft)):
        if spec:
            check_model_spec(spec, flag)
    if args.training_log and not Path(args.training_log).exists():
        raise CllmError(f"--training-log: folder not found: {args.training_log}")
    return methods


def settings_of(args, methods: list[str]) -> dict:
    s = {k: getattr(args, k) for k in SETTINGS_KEYS}
    s["methods"] = methods  # the resolved list, base_ar and base_<m> included
    s["base_model"] = args.base_model or args.model
    return s


def _limit_grows(old, new) -> bool:
    """A larger --limit (or none) keeps the finished prompts; the row ids are checked against the prompts too."""
    return old is not None and (new is None or new > old)


def _check_manifest(out_dir: Path, settings: dict, overwrite: bool, record_ids: list[str]) -> None:
    """Refuse a different eval in a folder holding rows; more methods or a larger --limit extend it.

    `record_ids` are the ids of this run's prompts by index: every finished row must name the prompt id at its index,
    so rows are not scored against another prompt (--spread picking others, a prompt file whose ids changed). Only ids
    are compared: a prompt file edited in place keeps its line-number ids and is not caught."""
    path = out_dir / "eval_manifest.json"
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        missing = [m for m in old.get("methods", []) if m not in settings["methods"]]
        if missing:
            raise CllmError(f"{out_dir} holds an eval of methods {','.join(old['methods'])}; this one leaves out "
                            f"{','.join(missing)}. Give every earlier method (new ones are added), or use another "
                            "--out-dir or --overwrite (finished rows are kept until then)")
        # A setting missing from the manifest was added to cllm after that eval started; the eval could not use it.
        # The method lists may grow (checked above); base_methods is part of the resolved `methods` list.
        for k in sorted((set(old) | set(settings)) - {"methods", "base_methods"}):
            if k == "limit" and k in old and _limit_grows(old[k], settings.get(k)):
                continue
            if k in old and old.get(k) != settings.get(k):
                hint = " (--limit may only grow)" if k == "limit" else ""
                raise CllmError(f"{out_dir} holds an eval with {k}={old.get(k)!r}, this one has {settings.get(k)!r}"
                                f"{hint}; use another --out-dir or --overwrite (finished rows are kept until then)")
        for r in read_rows(out_dir):
            i = r["index"]
            have = record_ids[i] if i < len(record_ids) else None
            if "id" in r and r["id"] != have:
                raise CllmError(f"{out_dir}: a finished row of prompt {i} is for {r['id']!r}, but this run's prompt "
                                f"{i} is {have!r}; the prompts changed. Use another --out-dir or --overwrite "
                                "(finished rows are kept until then)")
    if overwrite:
        for f in out_dir.glob("rows-*.jsonl"):
            f.unlink()
    path.write_text(json.dumps(settings, indent=2) + "\n")


def read_rows(out_dir: Path) -> list[dict]:
    """Every complete row of every rank's file (a torn last line from a kill is ignored)."""
    rows = []
    for f in sorted(out_dir.glob("rows-*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _repair(path: Path) -> None:
    """Cut a half-written last line (the process was killed mid-write) so appends start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def methods_done(rows: list[dict]) -> dict[int, set[str]]:
    """Prompt index -> the methods with a complete row for it."""
    by_index: dict[int, set] = {}
    for r in rows:
        by_index.setdefault(r["index"], set()).add(r["method"])
    return by_index


def run(args) -> None:
    from cllm import distributed
    from cllm.commands.decode import load_records

    methods = validate(args)
    args.prompt = None  # load_records reads it
    records = load_records(args)
    out_dir = Path(args.out_dir)
    ctx = distributed.setup()
    try:
        settings = settings_of(args, methods)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_manifest(out_dir, settings, args.overwrite, [r.id for r in records])
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        all_methods = methods
        have = methods_done(read_rows(out_dir))
        # prompt -> the methods still to run on it (all of them, or only those added to a finished eval)
        todo = {i: [m for m in all_methods if m not in have.get(i, set())]
                for i in ctx.shard(list(range(len(records))))}
        todo = {i: ms for i, ms in todo.items() if ms}

        if todo:  # a finished eval run again loads no model: it only rewrites the report
            _decode_prompts(args, ctx, records, todo, all_methods, out_dir)
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        if ctx.is_main:
            report = finish(out_dir, settings, all_methods, len(records), args.training_log)
            from cllm.eval.harness import summary_markdown

            print(summary_markdown(report))
    finally:
        distributed.teardown(ctx)


def _decode_prompts(args, ctx, records, todo: dict[int, list[str]], all_methods: list[str], out_dir: Path) -> None:
    """Decode this rank's unfinished prompts with the methods each still lacks; append one row per (prompt, method)."""
    from tqdm import tqdm

    from cllm.eval.harness import score
    from cllm.eval.metrics import token_logprobs
    from cllm.models import load_model
    from cllm.data.prompts import check_fits_context, format_prompt
    from cllm.eval.quality import is_degenerate
    from cllm.eval.report import result_row

    device = args.device or ctx.device()
    model, tok = load_model(args.model, args.dtype, device, adapter=args.adapter)
    base_spec = args.base_model or args.model
    if base_spec == args.model and not args.adapter:
        base = model  # the checkpoint is its own base
    else:
        base, _ = load_model(base_spec, args.dtype, device)
    draft = None
    if args.draft:
        from cllm.models import check_draft_compatible

        draft, draft_tok = load_model(args.draft, args.dtype, device)
        check_draft_compatible(model, tok, draft, draft_tok)
    spider_tables = _spider_tables(args, records)
    check_fits_context(model, {records[i].id: format_prompt(tok, records[i].prompt) for i in todo},
                       args.max_new_tokens)

    def run_method(m: str, ids: list[int], seed: int, cfg=registry.DecodeConfig.from_args(args)):
        if m.startswith("base_"):  # the base model; its AR is greedy (the reference)
            inner = m[len("base_"):]
            return registry.decode(inner, base, tok, [ids], [seed], cfg.greedy() if inner == "ar" else cfg,
                                   draft)[0]
        return registry.decode(m, model, tok, [ids], [seed], cfg, draft)[0]

    running = [m for m in all_methods if any(m in ms for ms in todo.values())]
    if args.warmup:  # untimed
        warm = format_prompt(tok, records[next(iter(todo))].prompt)
        short = registry.DecodeConfig.from_args(args, max_new_tokens=min(args.max_new_tokens, 2 * args.block_size))
        for _ in range(args.warmup):
            for m in running:
                run_method(m, warm, args.seed, short)

    from cllm.machine import machine_tag

    machine = machine_tag()  # on every row: a resumed eval may span machines, and the report says so
    # on every row: rows of one prompt from different runs were not timed interleaved, and the report says so
    run_id = new_run_id()
    rows_path = out_dir / f"rows-rank{ctx.rank}.jsonl"
    _repair(rows_path)
    bar = tqdm(total=len(todo), desc=f"eval {'+'.join(running)}", unit="prompt", disable=not ctx.is_main)
    with open(rows_path, "a", encoding="utf-8") as f:
        for n_done, (i, prompt_methods) in enumerate(todo.items()):
            rec = records[i]
            ids = format_prompt(tok, rec.prompt)
            k = n_done % len(prompt_methods)
            prompt_rows = []
            for m in prompt_methods[k:] + prompt_methods[:k]:  # rotate: no method always runs first
                t0, c0 = time.perf_counter(), time.process_time()
                res = run_method(m, ids, args.seed + i)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                row = result_row(i, rec, res)
                row.update(method=m, seconds=seconds, cpu_seconds=cpu, machine=machine, run=run_id)
                prompt_rows.append(row)
            for row in prompt_rows:  # untimed quality checks
                lp = token_logprobs(base, ids, row["token_ids"])
                row["base_logprob_mean"] = sum(lp) / len(lp) if lp else None
                row["correct"] = score(rec, row["text"], spider_tables, args.humaneval_timeout)
                row["degenerate"] = is_degenerate(row["token_ids"])
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
    bar.close()


def _spider_tables(args, records) -> dict:
    if not any(r.dataset == "spider" for r in records):
        return {}
    from cllm.data.datasets import default_data_dir

    root = Path(args.data_dir) if args.data_dir else default_data_dir()
    return {t["db_id"]: t for t in json.loads((root / "spider" / "tables.json").read_text())}


def finish(out_dir: Path, settings: dict, all_methods: list[str], n_prompts: int, training_log: str | None) -> dict:
    """Merge every rank's rows into report.json, summary.md, answers/<method>.jsonl and the plots."""
    from cllm.eval.harness import build_eval_report, summary_markdown, write_plots
    from cllm.eval.report import answer_line

    rows: dict[str, dict[int, dict]] = {m: {} for m in all_methods}
    for r in read_rows(out_dir):
        if r["method"] in rows:
            rows[r["method"]][r["index"]] = r  # a prompt redone after a kill: the last complete row counts
    complete = set.intersection(*(set(v) for v in rows.values())) if rows else set()
    if len(complete) < n_prompts:
        raise CllmError(f"{out_dir}: only {len(complete)} of {n_prompts} prompts are finished; run the same command "
                        "again to finish them")
    by_method = {m: [rows[m][i] for i in sorted(complete)] for m in all_methods}
    report = build_eval_report(by_method, settings)
    report["fingerprint"] = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(report))
    answers = out_dir / "answers"
    answers.mkdir(exist_ok=True)
    model_id = Path(str(settings["model"])).name
    for m, mrows in by_method.items():
        with open(answers / f"{m}.jsonl", "w", encoding="utf-8") as f:
            for r in mrows:
                line = answer_line({**r, "wall_time": r["seconds"]}, f"{model_id}-{m}")
                f.write(json.dumps(line) + "\n")
    write_plots(report, out_dir)
    if training_log:
        from cllm.eval.plots import plot_training_log

        plot_training_log(training_log, out_dir / "training_loss.png")
    return report
