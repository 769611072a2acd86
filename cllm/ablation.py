"""The ablation table: one row per `cllm pipeline` output folder (one config = one lever setting).

A row joins what the folders already hold: the pipeline config (objective, LoRA or full, consistency weight,
rounds), every round's trajectory summary and train_cost.json (prompts, steps, CPU hours), and the eval report
(held-out tokens per forward, speed-up over the base model's AR in the same run, accuracy, repeat rate).
"""

from __future__ import annotations

import json
from pathlib import Path

from cllm.errors import CllmError
from cllm.evaluate import per_prompt_speedups, quantile


# Loss settings that depart from the released trainers' (TrainConfig's defaults), as the table names them.
_OLD_SCALES = {"loss_normalization": ("token", "token scale"), "consistency_positions": ("block", "block positions"),
               "ar_scope": ("answer", "answer-only AR")}


def _objective(tc: dict) -> str:
    """The objective, with the Jacobi Forcing variants that differ from the paper's, the loss settings that differ
    from the released code's, and the base-KL anchor."""
    name = tc.get("objective", "cllm")
    old = [label for key, (value, label) in _OLD_SCALES.items() if tc.get(key) == value]
    extras = ["old loss scales"] if len(old) == len(_OLD_SCALES) else old
    if name == "jacobi_forcing" and tc.get("noisy_context", "noisy") != "noisy":
        extras.append(f"{tc['noisy_context']} context")
    if name == "jacobi_forcing" and (tc.get("noise_shifts") or 1) > 1:
        extras.append(f"{tc['noise_shifts']} shifts")
    if tc.get("base_kl_weight"):
        extras.append(f"base KL {tc['base_kl_weight']:g}")
    return f"{name} ({', '.join(extras)})" if extras else name


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _prompts(row: dict) -> str:
    """Training prompts of a row for the table: `400+200` for two rounds; rows saved before the per-round field
    have only round 1's count."""
    per_round = row.get("train_prompts_per_round") or []
    return "+".join(str(n) for n in per_round) if len(per_round) > 1 else _f(row["train_prompts"], "d")


def ablation_row(run_dir: str | Path, method: str = "jacobi") -> dict:
    """Statistics of one pipeline folder (rounds in out/, out/round2, ...); missing stages give None fields."""
    from cllm.commands.eval import read_rows
    from cllm.trajectories import first_prompts_cpu_seconds, summarize

    run = Path(run_dir)
    report = _json(run / "eval" / "report.json")
    if report is None:
        raise CllmError(f"{run}: no eval/report.json (has its pipeline finished?)")
    rounds = [run] + sorted((p for p in run.glob("round*") if p.is_dir()), key=lambda p: int(p.name[5:] or 0))
    cpu_s, steps, train_cfg = 0.0, 0, None
    prompts_per_round: list[int] = []
    shared = (_json(run / "pipeline.json") or {}).get("trajectories")
    for r in rounds:
        gen_dir = Path(shared) if shared and r == run else r / "trajectories"
        round_cfg = _json(r / "train" / "cllm_train.json") or {}
        if (gen_dir / "manifest.json").is_file():
            gen = summarize(gen_dir)
            done = gen["prompts_done"]
            used = min(done, round_cfg.get("max_prompts") or done)
            gen_cpu = gen.get("cpu_seconds") or 0.0
            if shared and r == run and used < done:
                # Shared data may since have grown past what this row trained on (a larger --limit extends it):
                # count what collecting this row's prompts cost. Own data counts in full.
                gen_cpu = first_prompts_cpu_seconds(gen_dir, used)
            cpu_s += gen_cpu
            prompts_per_round.append(used)
        cost = _json(r / "train" / "train_cost.json")
        if cost:
            cpu_s += cost["cpu_seconds"]
            steps += cost["segments"][-1]["to_step"]  # each round's trainer counts its own steps from 0
        train_cfg = round_cfg or train_cfg
    methods = report["methods"]
    if method not in methods:
        raise CllmError(f"{run}: the eval has no {method!r} rows (methods: {', '.join(methods)})")
    m, base = methods[method], methods.get("base_ar", {})
    tc = train_cfg or {}
    per_prompt = per_prompt_speedups(read_rows(run / "eval"), method)
    return {
        "name": run.name,
        "objective": _objective(tc),
        "tuning": ("LoRA r=%s" % tc.get("lora_r")) if tc.get("use_peft") else "full",
        "consistency_weight": tc.get("consistency_weight"),
        "rounds": len([r for r in rounds if (r / "train").is_dir()]),
        "train_prompts": prompts_per_round[0] if prompts_per_round else None,  # round 1's
        # Later rounds may re-collect the same prompts or new ones (an offset): list them per round, not summed.
        "train_prompts_per_round": prompts_per_round,
        "steps": steps,
        "cpu_seconds": round(cpu_s, 1),  # trajectory collection (its share, if shared) + training, every round
        "eval_prompts": m.get("n_prompts"),
        "tokens_per_forward": m.get("tokens_per_forward"),
        "speedup": m.get("speedup_vs_base_ar"),  # aggregate: all tokens over all seconds, against base AR's
        "speedup_p10": quantile(per_prompt, 0.1),
        "speedup_median": quantile(per_prompt, 0.5),
        "speedup_p90": quantile(per_prompt, 0.9),
        "dtype": report["settings"].get("dtype"),
        "accuracy": m.get("accuracy"),
        "accuracy_base": base.get("accuracy"),
        "repeat_rate": m.get("repeat_rate"),
        "repeat_rate_base": base.get("repeat_rate"),
    }


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def ablation_markdown(rows: list[dict]) -> str:
    lines = ["| run | objective | tuning | cons. weight | rounds | train prompts | steps | CPU h | eval prompts "
             "| tokens/forward | speed-up (dtype; per-prompt median [p10, p90]) | accuracy (base) | repeat rate (base) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['objective']} | {r['tuning']} | {_f(r['consistency_weight'], 'g')} | {r['rounds']} "
            f"| {_prompts(r)} | {r['steps']} | {r['cpu_seconds'] / 3600:.2f} | {_f(r['eval_prompts'], 'd')} "
            f"| {_f(r['tokens_per_forward'], '.3f')} | {_f(r['speedup'], '.2f')}x ({r['dtype']}; per prompt "
            f"{_f(r.get('speedup_median'), '.2f')} [{_f(r.get('speedup_p10'), '.2f')}, {_f(r.get('speedup_p90'), '.2f')}]) "
            f"| {_f(r['accuracy'], '.3f')} ({_f(r['accuracy_base'], '.3f')}) "
            f"| {_f(r['repeat_rate'], '.3f')} ({_f(r['repeat_rate_base'], '.3f')}) |")
    return "\n".join(lines) + "\n"
