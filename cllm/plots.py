"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

from cllm.errors import CllmError


def read_log_history(source: str | Path) -> list[dict]:
    """Trainer log history from a training output folder (log_history.json, else the last checkpoint's
    trainer_state.json) or from such a file."""
    p = Path(source)
    candidates = [p] if p.is_file() else [p / "log_history.json",
                                          *sorted(p.glob("checkpoint-*/trainer_state.json"),
                                                  key=lambda q: int(q.parent.name.split("-")[-1]), reverse=True)]
    for c in candidates:
        if c.is_file():
            data = json.loads(c.read_text())
            return data["log_history"] if isinstance(data, dict) else data
    raise CllmError(f"no training log in {source} (log_history.json or checkpoint-*/trainer_state.json)")


def _save(fig, png: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_training_log(source: str | Path, png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [h for h in read_log_history(source) if "loss" in h and "step" in h]
    if not history:
        raise CllmError(f"{source}: the training log has no loss entries")
    keys = [("loss", "total"), ("loss/ar", "AR"), ("loss/consistency", "consistency"), ("loss/base_kl", "base KL")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            axes[0].plot(*zip(*pts), label=label)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].set_title("training losses")
    for key, label in [("tokens_converged", "tokens right after 1 step from the state"),
                       ("tokens_gained", "... beyond the state's own right prefix")]:
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            axes[1].plot(*zip(*pts), label=label)
    for key, label in [("jacobi/tokens_per_forward", "Jacobi tokens per forward (held-in)"),
                       ("jacobi/held_out_tokens_per_forward", "Jacobi tokens per forward (held out)")]:
        probe = [(h["step"], h[key]) for h in read_log_history(source) if key in h]
        if probe:
            axes[1].plot(*zip(*probe), "o-", label=label)
    axes[1].set_xlabel("step")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend()
    axes[1].set_title("convergence")
    return _save(fig, png)


def speedup_heights(rows: list[dict]) -> list[float]:
    """Bar heights for the speed-up panel: NaN (no bar) where a row has no speed-up, never 0."""
    return [float("nan") if r.get("speedup") is None else float(r["speedup"]) for r in rows]


def plot_ablation(rows: list[dict], png: str | Path) -> Path:
    """Two panels over the ablation rows (`cllm.ablation.ablation_row` dicts): held-out tokens per forward against
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
    return _save(fig, png)
