"""The MTAD curve of the paper from one interleaved `cllm eval`: perplexity against speed, block efficiency against
tau, for each beam width, beside AR sampling and SpS.

    python -m experiments.mtad_curve.plot runs/mtad_curve/report.json --out docs/results/mtad_curve

The eval runs `ar` (sampling), `sps` and MTAD variants `mtad:tau=T:beam_width=B` on the same prompts and seeds
(experiments/mtad_curve/README.md has the command); this reads its report.json and writes curve.md,
perplexity_vs_speed.png and block_efficiency_vs_tau.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cllm.decoding.registry import split_variant
from cllm.errors import CllmError


def curve_rows(report: dict) -> list[dict]:
    """One row per sampling method of the eval: name, tau, beam width and beam weights (MTAD variants), tokens/s,
    perplexity under the unwarped target, block efficiency, accuracy, CPU seconds and joules per token (the energy
    proxies). The greedy reference (base_*) is left out."""
    rows = []
    for name, m in report["methods"].items():
        if name.startswith("base_"):
            continue
        base, options = split_variant(name)
        rows.append({"method": name, "kind": base, "tau": options.get("tau", report["settings"].get("tau")),
                     "beam_width": options.get("beam_width", report["settings"].get("beam_width")),
                     "beam_weights": options.get("beam_weights", report["settings"].get("beam_weights", "joint")),
                     "tokens_per_second": m.get("tokens_per_second"), "perplexity": m.get("perplexity_base"),
                     "block_efficiency": m.get("block_efficiency"), "accuracy": m.get("accuracy"),
                     "cpu_s_per_token": m.get("cpu_s_per_token"), "energy_j_per_token": m.get("energy_j_per_token")})
    if not any(r["kind"] == "mtad" for r in rows):
        raise CllmError("no mtad rows in the report: run the eval with mtad:tau=...:beam_width=... methods")
    return rows


def _ratio(x, ref):
    return x / ref if x is not None and ref else None


def curve_markdown(rows: list[dict]) -> str:
    """The table: each method's speed and block efficiency against SpS's, perplexity against AR sampling's (the
    paper's three comparisons), accuracy and CPU seconds per token."""
    ar = next((r for r in rows if r["kind"] == "ar"), {})
    sps = next((r for r in rows if r["kind"] == "sps"), {})

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["| method | tau | beams | tok/s | speed vs SpS | perplexity | vs AR sampling | block efficiency | vs SpS "
             "| accuracy | CPU s/token |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"ar": 0, "sps": 1}
    for r in sorted(rows, key=lambda r: (order.get(r["kind"], 2), r["beam_weights"] != "joint", r["beam_width"] or 0,
                                         r["tau"] or 0)):
        mtad = r["kind"] == "mtad"
        rel = _ratio(r["perplexity"], ar.get("perplexity"))
        tau, beams = (f(r["tau"], "g"), f(r["beam_width"], "d")) if mtad else ("-", "-")
        name = r["kind"] + (" (released beam weights)" if mtad and r["beam_weights"] == "released" else "")
        lines.append(f"| {name} | {tau} | {beams} | {f(r['tokens_per_second'], '.2f')} "
                     f"| {f(_ratio(r['tokens_per_second'], sps.get('tokens_per_second')), '.2f')}x "
                     f"| {f(r['perplexity'], '.3f')} | {f(rel - 1 if rel else None, '+.1%')} "
                     f"| {f(r['block_efficiency'], '.3f')} "
                     f"| {f(_ratio(r['block_efficiency'], sps.get('block_efficiency')), '.2f')}x "
                     f"| {f(r['accuracy'], '.3f')} | {f(r['cpu_s_per_token'], '.4f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cllm.eval.plots import save_figure

    widths = sorted({r["beam_width"] for r in rows if r["kind"] == "mtad"})
    joint = [r for r in rows if r["kind"] == "mtad" and r["beam_weights"] == "joint"]  # the curves
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for b in widths:
        pts = sorted((r["tokens_per_second"], r["perplexity"]) for r in joint if r["beam_width"] == b)
        ax.plot(*zip(*pts), "o-", label=f"MTAD, {b} beams")
    for kind, marker in (("ar", "s"), ("sps", "^")):
        for r in (r for r in rows if r["kind"] == kind):
            ax.plot(r["tokens_per_second"], r["perplexity"], marker, markersize=9, label=kind.upper())
    for r in (r for r in rows if r["kind"] == "mtad" and r["beam_weights"] != "joint"):
        ax.plot(r["tokens_per_second"], r["perplexity"], "x", markersize=9,
                label=f"MTAD, {r['beam_weights']} weights, tau {r['tau']}, {r['beam_width']} beams")
    ax.set_xlabel("tokens per second")
    ax.set_ylabel("perplexity under the target")
    ax.legend(fontsize=8)
    first = save_figure(fig, out / "perplexity_vs_speed.png")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for b in widths:
        pts = sorted((r["tau"], r["block_efficiency"]) for r in joint if r["beam_width"] == b)
        ax.plot(*zip(*pts), "o-", label=f"MTAD, {b} beams")
    for r in (r for r in rows if r["kind"] == "sps"):
        ax.axhline(r["block_efficiency"], color="gray", ls="--", label="SpS")
    ax.set_xlabel("tau")
    ax.set_ylabel("block efficiency")
    ax.legend(fontsize=8)
    return [first, save_figure(fig, out / "block_efficiency_vs_tau.png")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.mtad_curve.plot", description=__doc__.splitlines()[0])
    p.add_argument("report", help="report.json of the eval")
    p.add_argument("--out", required=True, help="folder for curve.md and the two PNGs")
    args = p.parse_args(argv)
    try:
        rows = curve_rows(json.loads(Path(args.report).read_text()))
    except (OSError, ValueError, KeyError, CllmError) as e:
        print(f"error: {args.report}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.md").write_text(curve_markdown(rows))
    (out / "curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out)
    print(curve_markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
