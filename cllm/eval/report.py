"""Rows, answer files, the comparison against a reference and `cllm decode`'s table: pure functions of per-prompt
rows, testable without a model. The report itself is `cllm.eval.summary.build_eval_report`, for decode and eval."""

from __future__ import annotations

import textwrap
import time


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
    """The table `cllm decode` prints from its report (`cllm.eval.summary`'s, against `ar`): every column
    labelled (a legend below it), each method's own figures filled (draft statistics only where a method drafts),
    and one line per method slower than AR saying why."""
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    methods, s0 = report["methods"], report["settings"]
    hf = "hf" in methods
    drafts = any(s.get("acceptance_rate") is not None for s in methods.values())
    auto = " (auto)" if s0.get("dtype_requested") == "auto" else ""
    head = (f"{'method':<12} {'tokens':>7} {'forwards':>8} {'tok/fwd':>8} {'max_acc':>7} {'tok/s':>7} "
            f"{'x_vs_ar':>8} {'same_as_ar':>10} " + (f"{'x_vs_hf':>7} " if hf else "")
            + (f"{'draft_acc':>9} {'blk_eff':>7} " if drafts else "") + f"{'ppl':>7}")
    lines = [f"model {s0['model']}  dtype {s0['dtype']}{auto}  prompts {report['n_prompts']}", head]
    for m, s in methods.items():
        vs_hf = 1.0 if m == "hf" else s.get("speedup_vs_hf")
        longest = max((int(a) for a in s["accept_length_hist"]), default=None)
        lines.append(
            f"{m:<12} {s['new_tokens']:>7} {s['forwards']:>8} {fmt(s['tokens_per_forward'], '.3f'):>8} "
            f"{fmt(longest, 'd'):>7} {fmt(s['tokens_per_second'], '.2f'):>7} "
            f"{fmt(s.get('speedup_vs_ar'), '.3f'):>8} {fmt(s.get('exact_match_ar'), '.2f'):>10} "
            + (f"{fmt(vs_hf, '.3f'):>7} " if hf else "")
            + (f"{fmt(s.get('acceptance_rate'), '.3f'):>9} {fmt(s.get('block_efficiency'), '.3f'):>7} "
               if drafts else "") + f"{fmt(s.get('perplexity_base'), '.3f'):>7}")
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
