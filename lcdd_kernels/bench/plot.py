"""Draw the provider ratios of a results file (``lcdd bench plot RESULTS.json --out PNG``).

One row of panels per (suite, device, dtype) in the file: time relative to the baseline provider
for each mode, and the extra peak memory in weight copies, with one bar per provider and shape.
"""

from __future__ import annotations

from pathlib import Path

from .prepared import MODES
from .results import load_results


def plot_rows(rows: list[dict], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    rows = [r for r in rows if "error" not in r]
    if not rows:
        raise ValueError("no measured rows to plot (every row is missing or failed)")
    panels = sorted({(r["suite"], r["device"], r["dtype"]) for r in rows}, key=str)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != r["baseline"]))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    ncols = len(modes) + 1
    fig, axes = plt.subplots(len(panels), ncols, figsize=(4.2 * ncols, 3.9 * len(panels) + 0.5), squeeze=False)
    for axrow, (suite, device, dtype) in zip(axes, panels):
        sel = [r for r in rows if (r["suite"], r["device"], r["dtype"]) == (suite, device, dtype)]
        base = sel[0]["baseline"]
        for ax, mode in zip(axrow, modes):
            _bars(ax, [r for r in sel if r["mode"] == mode], "time_vs_baseline", colors)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
            ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.set_title(f"{mode}: time / {base} (log)", fontsize=9)
        mem = [r for r in sel if r["mode"] == "full" and r.get("extra_weight_copies") is not None]
        _bars(axrow[-1], mem, "extra_weight_copies", colors)
        axrow[-1].axhline(0.0, color="k", lw=0.8)
        axrow[-1].set_title(f"full: peak memory over {base}, in weight copies", fontsize=9)
        axrow[0].set_ylabel(f"{suite} · {dtype}\n{device[:48]}", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper center", ncol=len(colors), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bars(ax, rows: list[dict], key: str, colors: dict) -> None:
    """One bar per (group, provider) for the non-baseline providers."""
    rows = [r for r in rows if r["provider"] in colors]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    if not groups:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(colors)
    for i, p in enumerate(colors):
        vals = {r["group"]: r.get(key) for r in rows if r["provider"] == p}
        xs = [g + (i - (len(colors) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [float("nan") if vals.get(g) is None else vals[g] for g in groups], width, color=colors[p])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=7)


def add_arguments(p) -> None:
    p.add_argument("results", help="a JSON file written by lcdd bench <suite> --out")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    if Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to replace it")
    path = plot_rows(load_results(args.results)["rows"], args.out)
    print(f"wrote {path}")
    return 0
