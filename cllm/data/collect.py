"""Stage 1 of the pipeline: collect Jacobi trajectories of a model over a prompt set, resumably.

The one module of `cllm.data` that runs a model: it decodes with `cllm.decoding.jacobi_decode` and writes through
the trajectory store (`cllm.data.trajectories`). `cllm gen`, `data_gen/generate_trajectories.py` and `cllm pipeline`
call `generate`.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from cllm.errors import CllmError
from cllm.data.trajectories import GenConfig


def load_source(cfg: GenConfig):
    """All prompts of the source with `offset`/`limit` applied, and the bad lines skipped (prompt files only)."""
    from cllm.data.datasets import window, load_dataset_prompts, read_prompt_file

    if cfg.dataset:
        return load_dataset_prompts(cfg.dataset, cfg.split, cfg.data_dir, cfg.limit, cfg.offset), []
    records, bad = read_prompt_file(cfg.prompts, cfg.prompt_field, cfg.on_bad_record, cfg.template)
    return window(records, cfg.limit, cfg.offset), bad


def label_text(answer: str) -> str:
    """Ground-truth answer text for label_ids (GSM8K calculator annotations <<a*b=c>> removed)."""
    return re.sub(r"<<[^>]*>>", "", answer)


def generate(cfg: GenConfig, after_commit=None) -> dict:
    """Run (or resume) a collection job; returns the summary of the whole output folder.

    The model loads before anything is written, so a bad --model or --max-new-tokens leaves the output folder
    untouched. `after_commit(n_committed_batches)` is called after every committed batch (tests use it to
    interrupt).
    """
    from tqdm import tqdm

    from cllm import distributed
    from cllm.data.trajectories import summarize

    records, bad = load_source(cfg)
    ctx = distributed.setup()
    try:
        n_workers = cfg.num_shards * ctx.world_size
        worker = cfg.shard_index * ctx.world_size + ctx.rank
        tag = f"{worker:05d}-of-{n_workers:05d}"
        model, tok, max_prompt = _load(cfg, ctx)
        store = _open_store(cfg, ctx, n_workers, tag)
        done = store.done_ids()
        mine = records[worker::n_workers]
        todo = [r for r in mine if r.index not in done]
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"gen {tag}", unit="prompt",
                   disable=not ctx.is_main)
        t_start = time.perf_counter()
        for n_batches, start in enumerate(range(0, len(todo), cfg.batch_size), 1):
            batch = todo[start : start + cfg.batch_size]
            stats = _collect_batch(cfg, model, tok, max_prompt, batch, store)
            bar.update(len(batch))
            bar.set_postfix(blocks=stats["blocks_kept"], it_per_s=f"{stats['forwards'] / stats['seconds']:.1f}")
            if after_commit is not None:
                after_commit(n_batches)
        bar.close()
        wall = time.perf_counter() - t_start
        _barrier(ctx)
        summary = summarize(Path(cfg.out))
        summary["bad_records_skipped"] = len(bad)
        summary["this_run_seconds"] = round(wall, 2)
        if ctx.is_main:
            print(format_summary(Path(cfg.out), summary))
            for line in bad[:5]:
                print(f"  skipped bad record: {line}")
        return summary
    finally:
        distributed.teardown(ctx)


def _barrier(ctx) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _load(cfg: GenConfig, ctx):
    """(model, tokenizer, the longest prompt that leaves room for max_new_tokens in the model's context)."""
    from cllm.models import ModelSpec

    loaded = ModelSpec(cfg.model, cfg.adapter, cfg.dtype, cfg.device or ctx.device()).load()
    model, tok = loaded.model, loaded.tokenizer
    context = getattr(model.config, "max_position_embeddings", None) or 10**9
    max_prompt = cfg.max_prompt_tokens or context - cfg.max_new_tokens
    if max_prompt < 1:
        raise CllmError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model "
                        f"context of {context} tokens")
    return model, tok, max_prompt


def _open_store(cfg: GenConfig, ctx, n_workers: int, tag: str):
    """Write (rank 0) or check (the other ranks, after it) the manifest, then open this worker's shard store."""
    from cllm.data.trajectories import ShardStore, check_or_write_manifest, fingerprint

    out = Path(cfg.out)
    fp = fingerprint(cfg, n_workers)
    if ctx.is_main:
        check_or_write_manifest(out, fp, cfg.overwrite)
    _barrier(ctx)
    if not ctx.is_main:
        check_or_write_manifest(out, fp, overwrite=False)
    store = ShardStore(out, tag, cfg.shard_records, cfg.overwrite)
    if store.repaired_bytes:
        print(f"[cllm gen] {tag}: cut {store.repaired_bytes} bytes of uncommitted output; redoing those prompts",
              file=sys.stderr)
    return store


def _prompt_ids(cfg: GenConfig, tok, max_prompt: int, batch) -> tuple[list, dict]:
    """The batch's (record, prompt ids) pairs to decode, and {index: reason} of the prompts skipped."""
    from cllm.data.prompts import format_prompt

    skipped, ready = {}, []
    for rec in batch:
        try:
            ids = format_prompt(tok, rec.prompt)
        except CllmError:
            skipped[rec.index] = "empty"
            continue
        if len(ids) > max_prompt:
            if cfg.on_long_prompt == "skip":
                skipped[rec.index] = "too_long"
                continue
            ids = ids[-max_prompt:]
        ready.append((rec, ids))
    return ready, skipped


def _decode(cfg: GenConfig, model, tok, ready: list) -> list:
    """The batch's results with their trajectories: Jacobi's blocks, or a gated decode's guesses tiled into
    consecutive blocks (`tile_guesses`), one prompt at a time."""
    seeds = [cfg.seed * 1_000_003 + rec.index for rec, _ in ready]
    if cfg.decoder == "jacobi":
        from cllm.decoding import jacobi_decode
        from cllm.decoding.options import JacobiOptions

        opts = JacobiOptions(block_size=cfg.block_size, init=cfg.init, record_trajectory=True)
        return jacobi_decode(model, tok, [ids for _, ids in ready], opts, cfg.max_new_tokens, seed=seeds)
    from cllm.data.trajectories import tile_guesses
    from cllm.decoding.registry import DecodeConfig, decode

    dcfg = DecodeConfig(cfg.max_new_tokens, block_size=cfg.block_size)
    results = [decode(cfg.decoder, model, tok, [ids], [seed], dcfg)[0] for (_, ids), seed in zip(ready, seeds)]
    for res in results:
        res.trajectory = tile_guesses(res.trajectory, res.token_ids)
    return results


def _collect_batch(cfg: GenConfig, model, tok, max_prompt: int, batch, store) -> dict:
    """Decode one batch with trajectories recorded and commit its records; returns the batch's statistics."""
    from cllm.data.trajectories import block_records

    t0, c0 = time.perf_counter(), time.process_time()
    ready, skipped = _prompt_ids(cfg, tok, max_prompt, batch)
    out_records, stats = [], {"blocks_kept": 0, "blocks_dropped": 0, "iterations": 0, "blocks": 0,
                              "new_tokens": 0, "forwards": 0, "state_tokens": 0}
    if ready:
        results = _decode(cfg, model, tok, ready)
        for (rec, ids), res in zip(ready, results):
            labels = None
            if cfg.labels and rec.answer:
                labels = tok(label_text(rec.answer), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            recs, dropped = block_records(rec.index, rec.id, ids, res, cfg, labels)
            out_records.extend(recs)
            stats["blocks_kept"] += len(recs)
            stats["blocks_dropped"] += dropped
            stats["blocks"] += len(res.trajectory)
            stats["iterations"] += sum(len(b.states) for b in res.trajectory)
            stats["new_tokens"] += res.n_new_tokens
            stats["forwards"] += res.n_forwards
            stats["state_tokens"] += sum(len(s) for r in recs for s in r["states"])
    stats["seconds"] = time.perf_counter() - t0
    stats["cpu_seconds"] = time.process_time() - c0
    store.commit(out_records, [rec.index for rec, _ in ready], skipped, stats)
    return stats


def format_summary(out: Path, s: dict) -> str:
    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped_reasons"].items())) or "none"
    return "\n".join([
        f"trajectories in {out}",
        f"  prompts done {s['prompts_done']}, skipped {s['prompts_skipped']} ({reasons}), "
        f"bad records skipped {s['bad_records_skipped']}",
        f"  blocks kept {s['blocks_kept']}, dropped as repetitive {s['blocks_dropped']}, records {s['records']}",
        f"  mean Jacobi iterations per block {f(s['mean_iterations_per_block'])}, "
        f"tokens per forward {f(s['tokens_per_forward'], '.3f')}",
        f"  generated tokens {s['new_tokens']}, trajectory state tokens {s['state_tokens']}",
        f"  decode seconds (all workers) {f(s['seconds'])} (CPU {f(s['cpu_seconds'])}), "
        f"this run wall {f(s['this_run_seconds'])} s",
    ])
