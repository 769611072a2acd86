"""The `cllm eval` run: every method on the same prompts, interleaved prompt by prompt (rotating order), together
with AR greedy of the BASE model (`base_ar`, the speed reference) in the same process.

Rows are appended per prompt (fsynced), so an interrupted eval resumes without redoing finished prompts; under
torchrun each rank takes a disjoint share and rank 0 writes report.json, summary.md, answers/<method>.jsonl and
the plots. A finished eval can be extended with more methods (a longer --methods/--base-methods list) or more
prompts (a larger --limit): only the new (prompt, method) pairs run, and every row records its run so the report
flags speed-ups that compare two runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from cllm.decoding import registry
from cllm.data.datasets import read_json
from cllm.errors import CllmError
from cllm.fileio import atomic_write_text, method_file_stem
from cllm.eval.config import REFERENCE, EvalConfig

SETTINGS_KEYS = ("model", "adapter", "base_model", "methods", "base_methods", "dataset", "prompts", "prompt_field",
                 "split", "limit", "offset", "spread", "max_new_tokens", "dtype", "seed", "draft")


def settings_of(cfg: EvalConfig, methods: list[str]) -> dict:
    """The eval's settings: its own keys, the decoding options as given, and every method's options in full
    (`method_options`, from each method's options dataclass: defaults included, so two evals compare exactly)."""
    s = {k: getattr(cfg, k) for k in SETTINGS_KEYS}
    s["methods"] = methods  # the resolved list, base_ar and base_<m> included
    s["base_model"] = cfg.base_model or cfg.model
    s["temperature"] = cfg.decoding.get("temperature", 0.0)
    dcfg = cfg.decode_config()
    s["method_options"] = {m: (dcfg.greedy() if m == REFERENCE else dcfg).settings(m.removeprefix("base_"))
                           for m in methods}
    return s


def _limit_grows(old, new) -> bool:
    """A larger --limit (or none) keeps the finished prompts; the row ids are checked against the prompts too."""
    return old is not None and (new is None or new > old)


def _check_method_options(out_dir: Path, old: dict, new: dict) -> None:
    """A method of the earlier eval must run with the same options (methods may be added). An option the earlier
    record lacks was added to cllm after that eval started, which ran as its default: at the default it matches."""
    for m in sorted(set(old) & set(new)):
        defaults = {f.name: f.default for f in dataclasses.fields(registry.get(m.removeprefix("base_")).options)}
        if {**{k: defaults.get(k, object()) for k in new[m]}, **old[m]} != new[m]:  # the record, added at defaults
            raise CllmError(f"{out_dir} holds an eval where {m} ran with {old[m]}, this one has {new[m]}; use another "
                            "--out-dir or --overwrite (finished rows are kept until then)")


def _check_flat_option(out_dir: Path, key: str, value, method_options: dict) -> None:
    """An eval started before options were recorded per method kept one flat value per option: every method of
    this run that has the option must use that value (the others never read it)."""
    for m, opts in method_options.items():
        field = registry.option_keys(m.removeprefix("base_")).get(key)
        if field is not None and opts.get(field) != value:
            raise CllmError(f"{out_dir} holds an eval with {key}={value!r}, this one runs {m} with {opts.get(field)!r}; "
                            "use another --out-dir or --overwrite (finished rows are kept until then)")


def _check_manifest(out_dir: Path, settings: dict, overwrite: bool, record_ids: list[str]) -> None:
    """Refuse a different eval in a folder holding rows; more methods or a larger --limit extend it.

    `record_ids` are the ids of this run's prompts by index: every finished row must name the prompt id at its index,
    so rows are not scored against another prompt (--spread picking others, a prompt file whose ids changed). Only ids
    are compared: a prompt file edited in place keeps its line-number ids and is not caught."""
    path = out_dir / "eval_manifest.json"
    if path.is_file() and not overwrite:
        old = read_json(path, "eval manifest",
                        "; use --overwrite (finished rows are kept until then) or another --out-dir")
        if not isinstance(old, dict):
            raise CllmError(f"{path}: corrupt eval manifest, not a JSON object; use --overwrite (finished rows are "
                            "kept until then) or another --out-dir")
        missing = [m for m in old.get("methods", []) if m not in settings["methods"]]
        if missing:
            raise CllmError(f"{out_dir} holds an eval of methods {','.join(old['methods'])}; this one leaves out "
                            f"{','.join(missing)}. Give every earlier method (new ones are added), or use another "
                            "--out-dir or --overwrite (finished rows are kept until then)")
        # A setting missing from the manifest was added to cllm after that eval started; the eval could not use it.
        # The method lists may grow (checked above); base_methods is part of the resolved `methods` list.
        _check_method_options(out_dir, old.get("method_options") or {}, settings["method_options"])
        for k in sorted((set(old) | set(settings)) - {"methods", "base_methods", "method_options"}):
            if k == "limit" and k in old and _limit_grows(old[k], settings.get(k)):
                continue
            if k in old and k not in settings and k in registry.option_table():  # a manifest of flat options
                _check_flat_option(out_dir, k, old[k], settings["method_options"])
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
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")  # a kill never leaves it torn


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


def run_eval(cfg: EvalConfig) -> dict | None:
    """Run (or resume, or extend) the eval; rank 0 returns the report, other ranks None."""
    from cllm import distributed
    from cllm.data.datasets import load_records
    from cllm.eval.summary import summary_markdown

    methods = cfg.method_names()
    records = load_records(cfg)
    out_dir = Path(cfg.out_dir)
    check_sandbox(cfg, records)
    ctx = distributed.setup()
    try:
        from cllm.machine import resolve_dtype

        cfg.dtype = resolve_dtype(cfg.dtype, cfg.device or ctx.device())  # recorded (and shown) resolved
        settings = settings_of(cfg, methods)
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_manifest(out_dir, settings, cfg.overwrite, [r.id for r in records])
        distributed.barrier(ctx)
        have = methods_done(read_rows(out_dir))
        # prompt -> the methods still to run on it (all of them, or only those added to a finished eval)
        todo = {i: [m for m in methods if m not in have.get(i, set())] for i in ctx.shard(list(range(len(records))))}
        todo = {} if cfg.report_only else {i: ms for i, ms in todo.items() if ms}
        if todo:  # a finished eval run again loads no model: it only rewrites the report
            _decode_prompts(cfg, ctx, records, todo, methods, out_dir)
        distributed.barrier(ctx)
        if not ctx.is_main:
            return None
        report = finish(out_dir, settings, methods, len(records), cfg.training_log, partial=cfg.report_only)
        print(summary_markdown(report))
        return report
    finally:
        distributed.teardown(ctx)


def _load_models(cfg: EvalConfig, ctx):
    """(checkpoint, base, tokenizer, draft or None): the base is the checkpoint itself when it has no adapter and no
    other base is named."""
    from cllm.models import ModelSpec

    device = cfg.device or ctx.device()
    loaded = ModelSpec(cfg.model, cfg.adapter, cfg.dtype, device, cfg.draft).load()
    base_spec = cfg.base_model or cfg.model
    same = base_spec == cfg.model and not cfg.adapter
    base = loaded.model if same else ModelSpec(base_spec, None, cfg.dtype, device).load().model
    return loaded.model, base, loaded.tokenizer, loaded.draft


def _method_runner(cfg: EvalConfig, model, base, tok, draft):
    """run(method, prompt ids, seed, decode config) -> DecodeResult; base_<m> runs on the base model, whose AR is
    greedy (the reference)."""
    def run(m: str, ids: list[int], seed: int, dcfg: registry.DecodeConfig) -> object:
        if m.startswith("base_"):
            inner = m[len("base_"):]
            return registry.decode(inner, base, tok, [ids], [seed], dcfg.greedy() if inner == "ar" else dcfg,
                                   draft)[0]
        return registry.decode(m, model, tok, [ids], [seed], dcfg, draft)[0]

    return run


def _decode_prompts(cfg: EvalConfig, ctx, records, todo: dict[int, list[str]], all_methods: list[str],
                    out_dir: Path) -> None:
    """Decode this rank's unfinished prompts with the methods each still lacks; append one row per (prompt, method)."""
    from tqdm import tqdm

    from cllm.data.prompts import check_fits_context, format_prompt
    from cllm.eval.measure import rotated, stamp

    model, base, tok, draft = _load_models(cfg, ctx)
    check_fits_context(model, {records[i].id: format_prompt(tok, records[i].prompt) for i in todo},
                       cfg.max_new_tokens)
    run = _method_runner(cfg, model, base, tok, draft)
    dcfg = cfg.decode_config()
    running = [m for m in all_methods if any(m in ms for ms in todo.values())]
    if cfg.warmup:  # untimed
        warm = format_prompt(tok, records[next(iter(todo))].prompt)
        short = cfg.decode_config(max_new_tokens=min(cfg.max_new_tokens, 32))
        for _ in range(cfg.warmup):
            for m in running:
                run(m, warm, cfg.seed, short)
    # On every row: a resumed eval may span machines, and rows of one prompt from different runs were not timed
    # interleaved; the report says so.
    marks = stamp()
    quality = _quality_scorer(cfg, records, base)
    rows_path = out_dir / f"rows-rank{ctx.rank}.jsonl"
    _repair(rows_path)
    bar = tqdm(total=len(todo), desc=f"eval {'+'.join(running)}", unit="prompt", disable=not ctx.is_main)
    with open(rows_path, "a", encoding="utf-8") as f:
        for n_done, (i, prompt_methods) in enumerate(todo.items()):
            ids = format_prompt(tok, records[i].prompt)
            timed = [_timed_row(run, m, i, records[i], ids, cfg.seed + i, dcfg, marks)
                     for m in rotated(prompt_methods, n_done)]  # no method always runs first
            for row in timed:
                f.write(json.dumps(quality(row, records[i], ids)) + "\n")  # untimed quality checks
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
    bar.close()


def _timed_row(run, m: str, i: int, rec, ids: list[int], seed: int, dcfg, marks: dict) -> dict:
    from cllm.eval.measure import rows_of, timed

    res, timing = timed(lambda: run(m, ids, seed, dcfg))
    return rows_of(m, [(i, rec)], [res], timing, marks)[0]


def check_sandbox(cfg: EvalConfig, records) -> str | None:
    """The sandbox level generated code will be scored at (None: no code to run); refuses a level weaker than
    namespaces unless --allow-weak-sandbox, before anything is written."""
    if not any(r.dataset == "humaneval" and "test" in r.meta for r in records) or cfg.report_only:
        return None
    from cllm.eval.sandbox import isolation_level, why_basic

    level = isolation_level()
    if level != "namespaces" and not cfg.allow_weak_sandbox:
        raise CllmError(f"HumanEval runs generated code, and the sandbox here is only at the 'basic' level "
                        f"({why_basic()}): a hostile program could read your files and reach the network. Pass "
                        "--allow-weak-sandbox to run it anyway (the report records the level)")
    return level


def _quality_scorer(cfg: EvalConfig, records, base):
    """quality(row, record, prompt ids) -> the row with its mean log-probability under the base, correctness and
    degeneracy."""
    from cllm.eval.summary import score
    from cllm.eval.measure import add_quality
    from cllm.eval.metrics import token_logprobs

    spider_tables = _spider_tables(cfg, records)
    level = check_sandbox(cfg, records)

    def quality(row: dict, rec, ids: list[int]) -> dict:
        if rec.dataset == "humaneval" and "test" in rec.meta:
            row["sandbox_level"] = level
        return add_quality(row, token_logprobs(base, ids, row["token_ids"]),
                           score(rec, row["text"], spider_tables, cfg.humaneval_timeout, level))

    return quality


def _spider_tables(args, records) -> dict:
    if not any(r.dataset == "spider" for r in records):
        return {}
    from cllm.data.datasets import default_data_dir

    root = Path(args.data_dir) if args.data_dir else default_data_dir()
    return {t["db_id"]: t for t in json.loads((root / "spider" / "tables.json").read_text())}


def finish(out_dir: Path, settings: dict, all_methods: list[str], n_prompts: int, training_log: str | None,
           partial: bool = False) -> dict:
    """Merge every rank's rows into report.json, summary.md, answers/<method>.jsonl and the plots; `partial`
    (--report-only) reports the prompts every method finished when others are not."""
    from cllm.eval.summary import build_eval_report, summary_markdown, write_plots
    from cllm.eval.report import answer_line

    rows: dict[str, dict[int, dict]] = {m: {} for m in all_methods}
    for r in read_rows(out_dir):
        if r["method"] in rows:
            rows[r["method"]][r["index"]] = r  # a prompt redone after a kill: the last complete row counts
    complete = set.intersection(*(set(v) for v in rows.values())) if rows else set()
    if len(complete) < n_prompts and not (partial and complete):
        raise CllmError(f"{out_dir}: only {len(complete)} of {n_prompts} prompts are finished; run the same command "
                        "again to finish them" + ("" if partial else ", or add --report-only to report those"))
    by_method = {m: [rows[m][i] for i in sorted(complete)] for m in all_methods}
    report = build_eval_report(by_method, settings)
    report["prompts_finished"], report["prompts_planned"] = len(complete), n_prompts
    report["fingerprint"] = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(report))
    answers = out_dir / "answers"
    answers.mkdir(exist_ok=True)
    model_id = Path(str(settings["model"])).name
    for m, mrows in by_method.items():
        with open(answers / f"{method_file_stem(m)}.jsonl", "w", encoding="utf-8") as f:
            for r in mrows:
                line = answer_line({**r, "wall_time": r["seconds"]}, f"{model_id}-{m}")
                f.write(json.dumps(line) + "\n")
    write_plots(report, out_dir)
    if training_log:
        from cllm.eval.plots import plot_training_log

        plot_training_log(training_log, out_dir / "training_loss.png")
    return report
