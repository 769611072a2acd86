"""The ablation table: one row per `cllm pipeline` output folder (one config = one lever setting).

    python -m experiments.ablation.table RUN_DIR... [--out docs/results/ablation/table.md --append]

Experiment tooling, outside the library: it reads what `cllm pipeline` wrote and imports only `cllm`.

A row joins what the folders already hold: the pipeline config (objective, LoRA or full, consistency weight,
rounds), every round's trajectory summary and train_cost.json (prompts, steps, CPU hours), and the eval report
(held-out tokens per forward, speed-up over the base model's AR in the same run, accuracy, repeat rate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cllm.errors import CllmError
from cllm.eval.summary import per_prompt_speedups, quantile


# Loss settings that depart from the released trainers' (TrainConfig's defaults), as the table names them.
_OLD_SCALES = {"loss_normalization": ("token", "token scale"), "consistency_positions": ("block", "block positions"),
               "ar_scope": ("answer", "answer-only AR")}


def _tuning(tc: dict) -> str:
    if not tc.get("use_peft"):
        return "full"
    layers = tc.get("lora_layers", "all")
    return f"LoRA r={tc.get('lora_r')}" + ("" if layers == "all" else f" layers {layers}")


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
    from cllm.eval.runner import read_rows
    from cllm.data.trajectories import first_prompts_cpu_seconds, summarize

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
        "tuning": _tuning(tc),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.ablation.table", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`cllm pipeline` output folders, one row each")
    p.add_argument("--method", default="jacobi", help="eval method whose rows are compared (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="TABLE.md",
                   help="also write the table here (and TABLE.json, TABLE.png)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out's TABLE.json (rows whose pipeline folders are gone), "
                        "replacing those of the same name and adding new ones after them")
    return p


def write_table(args) -> None:
    from experiments.ablation.plot import plot_ablation

    rows = [ablation_row(r, args.method) for r in args.runs]
    if args.append:
        if not args.out:
            raise CllmError("--append needs --out TABLE.md (its TABLE.json holds the rows to keep)")
        rows = merge_rows(_read_rows(Path(args.out).with_suffix(".json")), rows)
    table = ablation_markdown(rows)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        plot_ablation(rows, out.with_suffix(".png"))


def _read_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        raise CllmError(f"--append: {path} does not exist (write the table once without --append)") from None
    except json.JSONDecodeError as e:
        raise CllmError(f"--append: {path} is not JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise CllmError(f"--append: {path} is not an ablation table (a list of rows with a name)")
    return rows


def merge_rows(kept: list[dict], new: list[dict]) -> list[dict]:
    """`kept` in order with each row of the same name replaced by its `new` row, then the other `new` rows."""
    by_name = {r["name"]: r for r in new}
    merged = [by_name.pop(r["name"], r) for r in kept]
    return merged + list(by_name.values())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        write_table(args)
    except CllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
