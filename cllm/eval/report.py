"""Reports and answer files of decoding runs: pure functions of per-prompt rows, testable without a model."""

from __future__ import annotations

import textwrap

import time


def method_summary(rows: list[dict], seconds: float, joules: float | None = None,
                   cpu_seconds: float | None = None) -> dict:
    """Totals for one method. `seconds` is the wall-clock time spent in its decode calls, `joules` the CPU
    package energy over them (None where no energy counter is readable), `cpu_seconds` the CPU time of this process
    (all threads) over them: the energy column's closest honest proxy where RAPL is not readable.

    Draft-then-verify rows (SpS, MTAD) carry `drafted`/`accepted`/`iterations`: acceptance_rate = accepted /
    drafted (= accepted / (iterations x gamma) with a fixed gamma, except where the length cap shortened the last
    drafts), block_efficiency = 1 + accepted / iterations. Rows with `logprobs` (the output's token log-probs
    under the unwarped target) give the perplexity exp(- mean over prompts of the mean log-prob).
    """
    from cllm.eval.metrics import perplexity

    new_tokens = sum(r["new_tokens"] for r in rows)
    forwards = sum(r["forwards"] for r in rows)
    accepts = [a for r in rows for a in r["accept_lengths"]]
    drafted = sum(r.get("drafted", 0) for r in rows)
    accepted = sum(r.get("accepted", 0) for r in rows)
    iterations = sum(r.get("iterations", 0) for r in rows)
    has_draft = any("drafted" in r for r in rows)
    return {
        "n_prompts": len(rows),
        "new_tokens": new_tokens,
        "wall_time_s": round(seconds, 6),  # microseconds: the rates beside it stay reproducible from it
        "forwards": forwards,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
        "ms_per_token": 1000 * seconds / new_tokens if new_tokens else None,
        "tokens_per_forward": new_tokens / forwards if forwards else None,
        "acceptance_rate": (accepted / drafted if drafted else 0.0) if has_draft else None,
        "block_efficiency": (1 + accepted / iterations if iterations else None) if has_draft else None,
        "perplexity": perplexity([r["logprobs"] for r in rows]) if rows and all("logprobs" in r for r in rows) else None,
        "energy_j_per_token": joules / new_tokens if joules is not None and new_tokens else None,
        "cpu_s_per_token": cpu_seconds / new_tokens if cpu_seconds is not None and new_tokens else None,
        "mean_accept_length": sum(accepts) / len(accepts) if accepts else None,
        "max_accept_length": max(accepts) if accepts else None,
        "fast_forward_tokens": sum(r["fast_forward"] for r in rows),
        "stationary_tokens": sum(r["stationary"] for r in rows),
        "finished_by_eos": sum(r["finish_reason"] == "eos" for r in rows),
        "per_prompt": [
            {
                "id": r["id"],
                "new_tokens": r["new_tokens"],
                "forwards": r["forwards"],
                "tokens_per_forward": r["new_tokens"] / r["forwards"] if r["forwards"] else None,
                "fast_forward": r["fast_forward"],
                "stationary": r["stationary"],
                **{k: r[k] for k in ("iterations", "drafted", "accepted") if k in r},
            }
            for r in rows
        ],
    }


def build_report(model: str, dtype: str, rows: dict[str, list[dict]], seconds: dict[str, float], settings: dict,
                 baseline: str = "ar", joules: dict[str, float | None] | None = None,
                 cpu_seconds: dict[str, float] | None = None) -> dict:
    """`{"model", "dtype", "n_prompts", "settings", "methods": {name: summary}}`; methods other than the baseline
    get `speedup_vs_ar` (ratio of tokens per second) and `identical_to_ar` (share of token-identical outputs),
    when the baseline ran greedy on the same prompts; with `hf` among the methods (Hugging Face `generate`, the
    yardstick a user knows) also `speedup_vs_hf` and `identical_to_hf`."""
    joules, cpu_seconds = joules or {}, cpu_seconds or {}
    methods = {m: method_summary(rows[m], seconds[m], joules.get(m), cpu_seconds.get(m)) for m in rows}
    n_prompts = max((len(v) for v in rows.values()), default=0)
    base_opts = (settings.get("method_options") or {}).get(baseline, {})
    greedy = base_opts.get("temperature", settings.get("temperature", 0.0)) == 0.0
    if baseline in rows:
        compare_with(methods, rows, baseline, "speedup_vs_ar", "identical_to_ar" if greedy else None,
                     include_ref=False, ids_key="not_identical_ids")
    if "hf" in rows and baseline != "hf":
        compare_with(methods, rows, "hf", "speedup_vs_hf", "identical_to_hf" if greedy else None, include_ref=False)
    return {"model": model, "dtype": dtype, "n_prompts": n_prompts, "settings": settings, "methods": methods}


def compare_with(stats: dict[str, dict], rows: dict[str, list[dict]], ref: str, speed_key: str,
                 match_key: str | None = None, include_ref: bool = True, matched=lambda m: True,
                 ids_key: str | None = None) -> None:
    """Against method `ref` (the reference of a decode or eval run), in place for every method's summary in
    `stats`: `speed_key` = its tokens/s over ref's (None when either is missing); with `match_key`, for the
    methods `matched` accepts, the share of prompts whose tokens equal ref's (the lossless check), and with
    `ids_key` the ids of those that differ. `include_ref=False` leaves ref's own summary alone."""
    ref_rate = stats[ref]["tokens_per_second"]
    ref_tokens = {r["index"]: r["token_ids"] for r in rows[ref]}
    for m, summary in stats.items():
        if m == ref and not include_ref:
            continue
        rate = summary["tokens_per_second"]
        summary[speed_key] = rate / ref_rate if rate and ref_rate else None
        if match_key and matched(m):
            same = [r["token_ids"] == ref_tokens.get(r["index"]) for r in rows[m]]
            summary[match_key] = sum(same) / len(same) if same else None
            if ids_key:
                summary[ids_key] = [r["id"] for r, s in zip(rows[m], same) if not s]


def result_row(index: int, rec, res) -> dict:
    """One prompt's row of a decode or eval run, from its prompt record and `DecodeResult`."""
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


def answer_line(row: dict, model_id: str) -> dict:
    """One answer in Spec-Bench's format (single turn)."""
    return {
        "question_id": row["id"],
        "category": row["category"],
        "model_id": model_id,
        "choices": [
            {
                "index": 0,
                "turns": [row["text"]],
                "decoding_steps": [row["forwards"]],
                "new_tokens": [row["new_tokens"]],
                "wall_time": [round(row["wall_time"], 5)],
                "accept_lengths": row["accept_lengths"],
            }
        ],
        "tstamp": time.time(),
    }


def format_table(report: dict) -> str:
    """The table `cllm decode` prints: every column labelled (a legend below it), each method's own figures filled
    (draft statistics only where a method drafts), and one line per method slower than AR saying why."""
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    methods = report["methods"]
    hf = "hf" in methods
    drafts = any(s.get("acceptance_rate") is not None for s in methods.values())
    auto = " (auto)" if report.get("settings", {}).get("dtype_requested") == "auto" else ""
    head = (f"{'method':<12} {'tokens':>7} {'forwards':>8} {'tok/fwd':>8} {'max_acc':>7} {'tok/s':>7} "
            f"{'x_vs_ar':>8} {'same_as_ar':>10} " + (f"{'x_vs_hf':>7} " if hf else "")
            + (f"{'draft_acc':>9} {'blk_eff':>7} " if drafts else "") + f"{'ppl':>7}")
    lines = [f"model {report['model']}  dtype {report['dtype']}{auto}  prompts {report['n_prompts']}", head]
    for m, s in methods.items():
        vs_hf = 1.0 if m == "hf" else s.get("speedup_vs_hf")
        vs_ar = 1.0 if m == "ar" else s.get("speedup_vs_ar")
        same = 1.0 if m == "ar" else s.get("identical_to_ar")
        lines.append(
            f"{m:<12} {s['new_tokens']:>7} {s['forwards']:>8} {fmt(s['tokens_per_forward'], '.3f'):>8} "
            f"{fmt(s.get('max_accept_length'), 'd'):>7} {fmt(s['tokens_per_second'], '.2f'):>7} "
            f"{fmt(vs_ar, '.3f'):>8} {fmt(same, '.2f'):>10} " + (f"{fmt(vs_hf, '.3f'):>7} " if hf else "")
            + (f"{fmt(s.get('acceptance_rate'), '.3f'):>9} {fmt(s.get('block_efficiency'), '.3f'):>7} "
               if drafts else "") + f"{fmt(s.get('perplexity'), '.3f'):>7}")
    legend = ("tok/fwd: tokens committed per forward pass; max_acc: most tokens one forward committed; x_vs_ar: "
              "wall-clock speed-up over ar in this run; same_as_ar: share of outputs token-identical to ar's"
              + ("; x_vs_hf: speed-up over Hugging Face generate" if hf else "")
              + ("; draft_acc: share of drafted tokens accepted; blk_eff: tokens per draft-verify round"
                 if drafts else "") + "; ppl: perplexity of the output under the model")
    lines += ["", textwrap.fill(legend, 118)]
    lines += [textwrap.fill(why, 118) for m, s in methods.items() if (why := _why_slower(m, s, methods.get("ar")))]
    return "\n".join(lines)


def _why_slower(name: str, s: dict, ar: dict | None) -> str | None:
    """One line for a method slower than AR: its tokens per forward against what one of its forwards cost here."""
    if ar is None or name == "ar" or not s.get("speedup_vs_ar") or s["speedup_vs_ar"] >= 1 or not s["forwards"]:
        return None
    cost = (s["wall_time_s"] / s["forwards"]) / (ar["wall_time_s"] / ar["forwards"])
    return (f"{name} is {s['speedup_vs_ar']:.2f}x ar: it commits {s['tokens_per_forward']:.2f} tokens per forward, "
            f"but each of its forwards took {cost:.2f}x an ar step here (a wider input, plus its own work); it gains "
            "only where tokens per forward exceed that cost (bench/window_cost.py measures a window's cost)")
