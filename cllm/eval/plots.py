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


def save_figure(fig, png: str | Path) -> Path:
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
    return save_figure(fig, png)
