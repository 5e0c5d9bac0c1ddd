"""Draw the provider ratios of a results file (``lcdd bench plot RESULTS.json --out PNG``).

One row of panels per (suite, device, dtype) in the file: time relative to the baseline provider
for each mode, and the extra peak memory in weight copies, with one bar per provider and shape.
"""

from __future__ import annotations

from pathlib import Path

from . import common


def plot_rows(rows: list[dict], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    if not rows:
        raise ValueError("no measured rows to plot (every row is missing or failed)")
    panels = sorted({(r["suite"], r["device"], r["dtype"]) for r in rows}, key=str)
    modes = [m for m in common.MODES if any(r["mode"] == m for r in rows)]
    ncols = len(modes) + 1
    fig, axes = plt.subplots(len(panels), ncols, figsize=(4.2 * ncols, 3.8 * len(panels)), squeeze=False)
    for axrow, (suite, device, dtype) in zip(axes, panels):
        sel = [r for r in rows if (r["suite"], r["device"], r["dtype"]) == (suite, device, dtype)]
        for ax, mode in zip(axrow, modes):
            _bars(ax, [r for r in sel if r["mode"] == mode], "time_vs_baseline", log=True)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(f"{mode}: time / {sel[0]['baseline']}")
        mem = [r for r in sel if r["mode"] == "full" and r.get("extra_weight_copies") is not None]
        _bars(axrow[-1], mem, "extra_weight_copies", log=False)
        axrow[-1].axhline(0.0, color="k", lw=0.8)
        axrow[-1].set_title("full: extra peak memory (weight copies)")
        axrow[0].set_ylabel(f"{suite} · {dtype}\n{device[:40]}", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bars(ax, rows: list[dict], key: str, log: bool) -> None:
    groups = list(dict.fromkeys(r["group"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    if not groups:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        vals = {r["group"]: r.get(key) for r in rows if r["provider"] == p}
        xs = [g + (i - (len(providers) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [float("nan") if vals.get(g) is None else vals[g] for g in groups], width, label=p)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def add_arguments(p) -> None:
    p.add_argument("results", help="a JSON file written by lcdd bench <suite> --out")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    if Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to replace it")
    path = plot_rows(common.load_results(args.results)["rows"], args.out)
    print(f"wrote {path}")
    return 0
