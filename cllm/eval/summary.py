"""Checkpoint evaluation as pure functions of per-prompt rows: scoring, the report, `summary.md` and the plots.

A row is one prompt decoded by one method (the fields of `cllm decode`'s rows plus `seconds`, `cpu_seconds`,
`base_logprob_mean`, `correct`, `degenerate`). The reference method is AR greedy decoding of the BASE model on
the same prompts with the same length cap, run interleaved in the same process: every speed-up is against it.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from cllm.eval.config import REFERENCE
from cllm.eval.quality import extract_number, gsm8k_correct, humaneval_passes, spider_exact_match
from cllm.eval.report import compare_with


def score(rec, text: str, spider_tables: dict | None = None, timeout: float = 10.0,
          sandbox_level: str | None = None) -> bool | None:
    """Whether an answer is right, where the prompt's source lets us tell (None otherwise).

    gsm8k: final number; spider: exact-set-match with the db schema; humaneval: the tests pass against the program
    run in the sandbox at `sandbox_level` (`cllm.eval.sandbox`);
    prompt files with an `answer`: final-number match when the reference has a number, else normalised equality.
    """
    if rec.dataset == "humaneval" and "test" in rec.meta:
        return humaneval_passes(rec.meta, text, timeout, sandbox_level).passed
    if rec.answer is None:
        return None
    if rec.dataset == "gsm8k":
        return gsm8k_correct(text, rec.answer)
    if rec.dataset == "spider":
        return spider_exact_match(text, rec.answer, (spider_tables or {}).get(rec.meta.get("db_id")))
    if rec.dataset in ("sharegpt", "code"):
        return None  # free-form references: nothing to score against
    if extract_number(rec.answer) is not None:
        return extract_number(text) == extract_number(rec.answer)
    return " ".join(text.split()).lower() == " ".join(rec.answer.split()).lower()


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def per_prompt_speedups(rows: list[dict], method: str, reference: str = "base_ar") -> list[float]:
    """Per prompt, `method`'s tokens per second over `reference`'s on the same prompt (eval rows; prompts missing
    either method, or with no tokens or time, are left out), sorted."""
    by_prompt: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["index"], {})[r["method"]] = r
    out = []
    for d in by_prompt.values():
        m, ref = d.get(method), d.get(reference)
        if m and ref and m["seconds"] > 0 and ref["seconds"] > 0 and ref["new_tokens"] > 0:
            out.append((m["new_tokens"] / m["seconds"]) / (ref["new_tokens"] / ref["seconds"]))
    return sorted(out)


def quantile(sorted_xs: list[float], q: float) -> float | None:
    """Linear-interpolation quantile (numpy's default) of an ascending list; None when empty."""
    if not sorted_xs:
        return None
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(rows: list[dict], ref_rows: list[dict] | None, reference: str = REFERENCE) -> dict:
    """Statistics of one method over some rows; `ref_rows` are the reference method's rows on the same prompts (the
    comparisons are named after it: `speedup_vs_<reference>`, `exact_match_<reference>`)."""
    new_tokens = sum(r["new_tokens"] for r in rows)
    forwards = sum(r["forwards"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    cpu = sum(r["cpu_seconds"] for r in rows)
    rate = new_tokens / seconds if seconds > 0 else None
    out = {
        "n_prompts": len(rows),
        "new_tokens": new_tokens,
        "forwards": forwards,
        "wall_time_s": round(seconds, 6),  # microseconds: the rates beside it stay reproducible from it
        "tokens_per_second": rate,
        "tokens_per_forward": new_tokens / forwards if forwards else None,
        "ms_per_token": 1000 * seconds / new_tokens if new_tokens else None,
        "cpu_s_per_token": cpu / new_tokens if new_tokens else None,
        # RAPL energy where every row could read it (never estimated); rows from before it was recorded lack it
        "energy_j_per_token": (sum(r["joules"] for r in rows) / new_tokens
                               if rows and new_tokens and all(r.get("joules") is not None for r in rows) else None),
        "accept_length_hist": dict(sorted(Counter(a for r in rows for a in r["accept_lengths"]).items())),
        "fast_forward_tokens": sum(r["fast_forward"] for r in rows),
        "stationary_tokens": sum(r["stationary"] for r in rows),
        "accuracy": _mean([float(r["correct"]) if r["correct"] is not None else None for r in rows]),
        "n_scored": sum(r["correct"] is not None for r in rows),
        "repeat_rate": _mean([float(r["degenerate"]) for r in rows]),
        # A loop is easy to guess ahead: tokens per forward on the answers that do not loop, to tell speed from damage.
        "n_non_degenerate": sum(not r["degenerate"] for r in rows),
        "tokens_per_forward_non_degenerate": _ratio(sum(r["new_tokens"] for r in rows if not r["degenerate"]),
                                                    sum(r["forwards"] for r in rows if not r["degenerate"])),
        "perplexity_base": (math.exp(-_mean([r["base_logprob_mean"] for r in rows]))
                            if _mean([r["base_logprob_mean"] for r in rows]) is not None else None),
    }
    if any("drafted" in r for r in rows):
        drafted, accepted = sum(r.get("drafted", 0) for r in rows), sum(r.get("accepted", 0) for r in rows)
        iterations = sum(r.get("iterations", 0) for r in rows)
        out["acceptance_rate"] = accepted / drafted if drafted else 0.0
        out["block_efficiency"] = 1 + accepted / iterations if iterations else None
    if ref_rows is not None:
        ref_seconds = sum(r["seconds"] for r in ref_rows)
        ref_rate = sum(r["new_tokens"] for r in ref_rows) / ref_seconds if ref_seconds > 0 else None
        out[f"speedup_vs_{reference}"] = rate / ref_rate if rate and ref_rate else None
        ref_tokens = {r["index"]: r["token_ids"] for r in ref_rows}
        same = [r["token_ids"] == ref_tokens.get(r["index"]) for r in rows]
        out[f"exact_match_{reference}"] = sum(same) / len(same) if same else None
        out["not_identical_ids"] = [r.get("id", r["index"]) for r, s in zip(rows, same) if not s]
        # The spread over prompts beside the aggregate: the aggregate is dominated by long answers.
        per_prompt = (per_prompt_speedups([*rows, *ref_rows], rows[0]["method"], ref_rows[0]["method"])
                      if rows and ref_rows else [])
        out["speedup_per_prompt"] = {"p10": quantile(per_prompt, 0.1), "median": quantile(per_prompt, 0.5),
                                     "p90": quantile(per_prompt, 0.9)}
        # Rows added to a finished eval were timed in a later run than the reference (rows before run ids: None).
        ref_run = {r["index"]: r.get("run") for r in ref_rows}
        out[f"n_other_run_than_{reference}"] = sum(r.get("run") != ref_run.get(r["index"]) for r in rows)
    return out


def build_eval_report(rows: dict[str, list[dict]], settings: dict, reference: str = REFERENCE) -> dict:
    """`methods` (overall), `per_dataset` and `per_category` statistics of every method against `reference` (the
    eval's base_ar; `cllm decode`'s ar); each set also against the checkpoint's own AR and against Hugging Face
    `generate`, over the same prompts. The one report of `cllm eval` and `cllm decode`."""
    machines: dict[str, int] = {}  # timing setting -> prompts (rows written before it was recorded: "unrecorded")
    for r in next(iter(rows.values()), []):
        tag = r.get("machine") or "unrecorded"
        machines[tag] = machines.get(tag, 0) + 1
    report = {"settings": settings, "reference": reference, "machines": machines,
              "methods": _statistics(rows, reference), "per_dataset": {}, "per_category": {}}
    for key, bucket in (("dataset", "per_dataset"), ("category", "per_category")):
        for value in sorted({r[key] for mrows in rows.values() for r in mrows}):
            subset = {m: [r for r in mrows if r[key] == value] for m, mrows in rows.items()}
            report[bucket][value] = _statistics({m: mrows for m, mrows in subset.items() if mrows}, reference)
    report["hf_reference"] = _hf_reference(rows)
    levels = sorted({r["sandbox_level"] for mrows in rows.values() for r in mrows if r.get("sandbox_level")})
    report["sandbox_level"] = ", ".join(levels) or None  # how generated code was scored; None: none was run
    return report


def _statistics(rows: dict[str, list[dict]], reference: str = REFERENCE) -> dict[str, dict]:
    """summarize() of every method over `rows` (one set of prompts), with the own-AR and `generate` comparisons."""
    ref = rows.get(reference)
    stats = {m: summarize(mrows, ref, reference) for m, mrows in rows.items()}
    if rows.get("ar") and reference != "ar":  # the checkpoint's own AR, beside the base model's
        # Lossless check of a trained checkpoint: its decoders against its own greedy AR (the base's AR differs
        # once training moved the model).
        compare_with(stats, rows, "ar", "speedup_vs_own_ar", "exact_match_own_ar",
                     matched=lambda m: m != REFERENCE and not m.startswith("base_"))
    hf = _hf_reference(rows)
    if hf is not None and hf in stats:
        compare_with(stats, rows, hf, "speedup_vs_hf", "exact_match_hf")
    return stats


def _hf_reference(rows: dict[str, list[dict]]) -> str | None:
    """Hugging Face `generate` of the base model (`base_hf`, from --base-methods hf; or `hf` when the evaluated
    model is its own base): the reference a user already has."""
    return "base_hf" if "base_hf" in rows else "hf" if "hf" in rows else None


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _spread(stats: dict) -> str:
    q = stats.get("speedup_per_prompt") or {}
    if q.get("median") is None:
        return ""
    return f" ({q['median']:.2f} [{q['p10']:.2f}, {q['p90']:.2f}])"


def summary_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# cllm eval: {s.get('model')}" + (f" (adapter {s['adapter']})" if s.get("adapter") else ""),
        "",
        f"Base model `{s.get('base_model')}`, dtype {s.get('dtype')}, {s.get('max_new_tokens')} new tokens at most, "
        f"{report['methods'][next(iter(report['methods']))]['n_prompts']} prompts. "
        f"Speed-up is against AR greedy of the base model ({REFERENCE}) in the same run.",
        "",
        *([f"**Cut short: {report['prompts_finished']} of the {report['prompts_planned']} planned prompts are "
           "finished by every method (--report-only); the figures cover those.**", ""]
          if report.get("prompts_finished", 0) < report.get("prompts_planned", 0) else []),
        "Measured on: " + "; ".join(f"{m} ({n} prompts)" for m, n in report.get("machines", {}).items())
        + ("  **Timings from more than one machine are mixed: compare only ratios.**"
           if len(report.get("machines", {})) > 1 else ""),
        "",
        *([f"Generated code scored in the sandbox at the `{report['sandbox_level']}` level"
           + (" (weak: the program could read files and reach the network)" if "basic" in report["sandbox_level"]
              else " (bubblewrap namespaces, verdict decided outside the program)") + ".", ""]
          if report.get("sandbox_level") else []),
    ]
    for m, r in report["methods"].items():
        if r.get("n_other_run_than_base_ar"):
            lines += [f"**{m} was timed in another run than {REFERENCE} on {r['n_other_run_than_base_ar']} of "
                      f"{r['n_prompts']} prompts (added to a finished eval): its speed-ups compare two runs, not "
                      "interleaved timings.**", ""]
    own = any("exact_match_own_ar" in r for r in report["methods"].values())
    hf = report.get("hf_reference")
    lines += [
        "| method | accuracy | tokens/forward | tokens/s | speed-up (per-prompt median [p10, p90]) | "
        + (f"vs {hf} | " if hf else "") + "same as base AR | "
        + ("same as own AR | " if own else "") + "repeat rate | ppl (base) | CPU s/token |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if own else "") + ("---|" if hf else ""),
    ]
    for m, r in report["methods"].items():
        lines.append(
            f"| {m} | {_fmt(r['accuracy'], '.3f')} | {_fmt(r['tokens_per_forward'], '.3f')} | "
            f"{_fmt(r['tokens_per_second'], '.2f')} | {_fmt(r.get('speedup_vs_base_ar'), '.3f')}x{_spread(r)} | "
            + (f"{_fmt(r.get('speedup_vs_hf'), '.3f')}x | " if hf else "")
            + f"{_fmt(r.get('exact_match_base_ar'), '.2f')} | "
            + (f"{_fmt(r.get('exact_match_own_ar'), '.2f')} | " if own else "")
            + f"{_fmt(r['repeat_rate'], '.3f')} | {_fmt(r['perplexity_base'], '.3f')} | "
            f"{_fmt(r['cpu_s_per_token'], '.4f')} |"
        )
    if len(report["per_dataset"]) > 1:
        lines += ["", "| dataset | method | n | accuracy | tokens/forward | tokens/s | speed-up | "
                  + (f"vs {hf} | " if hf else "") + ("same as own AR |" if own else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if hf else "") + ("---|" if own else "")]
        for d, by_method in report["per_dataset"].items():
            for m, r in by_method.items():
                lines.append(f"| {d} | {m} | {r['n_prompts']} | {_fmt(r['accuracy'], '.3f')} | "
                             f"{_fmt(r['tokens_per_forward'], '.3f')} | {_fmt(r['tokens_per_second'], '.2f')} | "
                             f"{_fmt(r.get('speedup_vs_base_ar'), '.3f')}x | "
                             + (f"{_fmt(r.get('speedup_vs_hf'), '.3f')}x | " if hf else "")
                             + (f"{_fmt(r.get('exact_match_own_ar'), '.2f')} |" if own else ""))
    return "\n".join(lines + _options_lines(report["settings"])) + "\n"


def _options_lines(settings: dict) -> list[str]:
    """Each method's options in full (from its options dataclass), one line per method."""
    opts = settings.get("method_options") or {}
    if not opts:
        return []
    return ["", "Method options:", ""] + [
        f"- {m}: " + (", ".join(f"{k}={v}" for k, v in o.items()) or "none") for m, o in opts.items()]


def write_plots(report: dict, out_dir: str | Path) -> list[Path]:
    """accept_lengths.png (histogram per method) and per_dataset.png (tokens/forward and speed-up bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(report["methods"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        hist = {int(a): n for a, n in report["methods"][m]["accept_length_hist"].items()}
        total = sum(hist.values()) or 1
        xs = sorted(hist)
        ax.bar([x + k * width for x in xs], [hist[x] / total for x in xs], width=width, label=m)
    ax.set_xlabel("tokens accepted per forward pass")
    ax.set_ylabel("share of forward passes")
    ax.set_title("accepted lengths")
    ax.legend()
    fig.tight_layout()
    paths = [out_dir / "accept_lengths.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    datasets = list(report["per_dataset"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, m in enumerate(methods):
        xs = [i + k * width for i in range(len(datasets))]
        axes[0].bar(xs, [report["per_dataset"][d].get(m, {}).get("tokens_per_forward") or 0 for d in datasets],
                    width=width, label=m)
        axes[1].bar(xs, [report["per_dataset"][d].get(m, {}).get("speedup_vs_base_ar") or 0 for d in datasets],
                    width=width, label=m)
    for ax, title in zip(axes, ("tokens per forward", f"speed-up vs {REFERENCE}")):
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(datasets))], datasets)
        ax.set_title(title)
        ax.legend()
    axes[1].axhline(1.0, color="gray", lw=0.8)
    fig.tight_layout()
    paths.append(out_dir / "per_dataset.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
