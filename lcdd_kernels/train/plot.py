"""Training curves from a log (list of rows or ``log.jsonl``): task loss with its EMA and budget ε,
λ, and mask sparsity, against the optimizer step."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_log(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_log(log, png: str | os.PathLike) -> Path:
    """Write the curves of ``log`` (rows or a ``log.jsonl`` path) to ``png``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
    steps = [r["step"] for r in rows]
    lcdd = any("lambda" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if lcdd else 1, figsize=(13 if lcdd else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["task_loss"] for r in rows], lw=0.8, alpha=0.6, label="task loss")

    def series(key):
        return [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]

    for key, style in (("ema", "-"), ("epsilon", "--")):
        pts = series(key)
        if pts:
            ax.plot(*zip(*pts), style, lw=1.4, label="EMA" if key == "ema" else "budget ε")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(frameon=False)
    if lcdd:
        ax = axes[0][1]
        ax.plot(*zip(*series("lambda")), color="C3")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("λ")
        ax = axes[0][2]
        ax.plot(*zip(*series("sparsity")), color="C2")
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("mask sparsity (share off)")
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
