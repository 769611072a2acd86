"""The ablation figure: what each row bought (held-out tokens per forward against CPU hours) and its speed-up."""

from __future__ import annotations

from pathlib import Path

from cllm.errors import CllmError
from cllm.eval.plots import save_figure


def speedup_heights(rows: list[dict]) -> list[float]:
    """Bar heights for the speed-up panel: NaN (no bar) where a row has no speed-up, never 0."""
    return [float("nan") if r.get("speedup") is None else float(r["speedup"]) for r in rows]


def plot_ablation(rows: list[dict], png: str | Path) -> Path:
    """Two panels over the ablation rows (`table.ablation_row` dicts): held-out tokens per forward against
    the CPU hours spent, and the wall-clock speed-up over base AR with its per-prompt 10th-90th percentile range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise CllmError("plot_ablation: no rows to plot")
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        axes[0].scatter(r["cpu_seconds"] / 3600, r["tokens_per_forward"], s=40)
        axes[0].annotate(r["name"], (r["cpu_seconds"] / 3600, r["tokens_per_forward"]), fontsize=8,
                         xytext=(4, 4), textcoords="offset points")
    axes[0].set_xlabel("CPU hours (trajectory collection + training)")
    axes[0].set_ylabel("held-out tokens per forward")
    axes[0].set_title("what each row bought")
    xs = range(len(rows))
    speedups = speedup_heights(rows)
    axes[1].bar(xs, speedups, color="tab:blue")
    for x, r in zip(xs, rows):
        if r.get("speedup") is None:
            # No base AR in that eval: say so instead of drawing a 0x bar that reads as a measurement.
            axes[1].annotate("no AR run", (x, 0.05), ha="center", fontsize=7, rotation=90)
        if r.get("speedup_p10") is not None and r.get("speedup_p90") is not None:
            axes[1].plot([x, x], [r["speedup_p10"], r["speedup_p90"]], color="black", lw=1.5)
    axes[1].axhline(1.0, color="gray", ls="--", lw=1, label="AR of the base model")
    axes[1].set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    axes[1].set_ylabel(f"speed-up over base AR ({rows[0].get('dtype')})")
    axes[1].set_title("wall-clock: aggregate (bar), per-prompt p10-p90 (line)")
    axes[1].legend(fontsize=8)
    return save_figure(fig, png)
