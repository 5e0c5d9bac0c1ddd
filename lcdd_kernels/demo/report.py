"""The demo's report: ``report.json`` (numbers), ``curves.json`` (per-step logs), ``report.md`` (a
table like the paper's) and three plots: training curves, the carrier's sparsity per layer and
group, and the behaviour rate (with task and choice accuracy) per stage.

Every report file goes through :func:`write_files`, the one place that writes them."""

from __future__ import annotations

import io
import json
from pathlib import Path

STAGE_LABELS = {
    "base": "base",
    "sft": "SFT",
    "lcdd": "LCDD (base + carrier)",
    "lcdd_eraser": "LCDD + eraser",
    "sft_eraser": "SFT + eraser (ablation)",
}
PLOTS = ("curves.png", "sparsity_heatmap.png", "stages.png")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


#: behaviour -> the name of its behaviour rate in tables
RATE_LABELS = {"fixed": "fixed-response rate", "refusal": "refusal rate (harmful)", "style": "style rate"}


def _label(key: str) -> str:
    return key.replace("_", " ")


def summary_table(report: dict) -> str:
    """The per-stage table (markdown) that the CLI prints at the end and report.md starts with:
    the behaviour rate, task and choice accuracy, and the behaviour's own scores."""
    behaviour = report.get("behaviour", "fixed")
    rate_key = report.get("behaviour_rate_key", "fixed_response_rate")
    own = [k for k in report.get("behaviour_scores", []) if k != rate_key]
    rows = [f"| stage | {RATE_LABELS[behaviour]} | task accuracy | choice accuracy |"
            + "".join(f" {_label(k)} |" for k in own),
            "|---|---:|---:|---:|" + "---:|" * len(own)]
    rate = report.get("behaviour_rate", report["fixed_response_rate"])
    for stage, label in STAGE_LABELS.items():
        rows.append(f"| {label} | {_pct(rate[stage])} | "
                    f"{_pct(report['task_accuracy'][stage])} | {_pct(report['choice_accuracy'][stage])} |"
                    + "".join(f" {_pct(report[k][stage])} |" for k in own))
    return "\n".join(rows)


def markdown(report: dict) -> str:
    c, kl, sec = report["carrier"], report["kl"], report["seconds"]
    groups = " · ".join(f"{g} {_pct(v)}%" for g, v in c["sparsity"]["groups"].items())
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in sec.items() if k != "total")
    v = report["versions"]
    lines = [
        f"# lcdd demo: {report.get('behaviour', 'fixed')}, {report['family']}, seed {report['seed']}",
        "",
        f"Behaviour: {report.get('behaviour_description', 'fixed response')}. Percent of "
        f"{report['config']['n_heldout']} held-out prompts ({RATE_LABELS[report.get('behaviour', 'fixed')]}: "
        "docs/demo/behaviours.md). Task accuracy: exact match of the base tasks. Choice accuracy: the right "
        "answer among 4 by log-likelihood.",
        "",
        summary_table(report),
        "",
        "| KL (teacher-forced on the SFT model's answers) | value |",
        "|---|---:|",
        *(f"| {k.replace('_vs_', ' ‖ ')} | {val:.4f} |" for k, val in kl.items()),
        "",
        f"Carrier: sparsity {_pct(c['sparsity']['overall'])}% of mask entries off ({groups}); "
        f"{c['delta_parameters']:,} delta entries = {_pct(c['fraction_of_projection_weights'])}% of the "
        f"projection weights; {c['bytes']:,} bytes on disk; base + carrier vs the trained LCDD model: "
        f"max logit difference {c['max_logit_error_vs_lcdd_model']:.2e}.",
        "",
        f"Time: {sec['total']:.0f} s ({phases}); load average {report['load_average']['start'][0]:.1f} at "
        f"the start, {report['load_average']['end'][0]:.1f} at the end; torch threads: {v['threads']}; "
        f"torch {v['torch']}, transformers {v['transformers']}, lcdd-kernels {v['lcdd_kernels']}.",
        "",
        "![training curves](curves.png)",
        "![carrier sparsity](sparsity_heatmap.png)",
        "![per stage](stages.png)",
        "",
        "Sample responses (first held-out prompts):",
        "",
        "| prompt | " + " | ".join(STAGE_LABELS[s] for s in STAGE_LABELS) + " |",
        "|---|" + "---|" * len(STAGE_LABELS),
    ]
    samples = report["samples"]
    for i, s in enumerate(samples["base"]):
        cells = [f"`{samples[st][i]['response']}`" for st in STAGE_LABELS]
        lines.append(f"| `{s['prompt']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


def plot_curves(curves: dict) -> bytes:
    """Phase 0 and SFT loss, LCDD task loss with EMA and ε, λ, sparsity, eraser losses."""
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.8))
    ax = axes[0]
    ax.plot([r["step"] for r in curves["base"]], [r["loss"] for r in curves["base"]], lw=0.7, label="phase 0 (base)")
    ax.plot([r["step"] for r in curves["sft"]], [r["task_loss"] for r in curves["sft"]], lw=0.9, label="phase 1 (SFT)")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title="base and SFT training")
    ax.legend(frameon=False)
    lc = curves["lcdd"]
    steps = [r["step"] for r in lc]
    ax = axes[1]
    ax.plot(steps, [r["task_loss"] for r in lc], lw=0.6, alpha=0.5, label="task loss")
    ax.plot(steps, [r["ema"] for r in lc], lw=1.2, label="EMA")
    eps = [(s, r["epsilon"]) for s, r in zip(steps, lc) if r.get("epsilon") is not None]
    if eps:
        ax.plot(*zip(*eps), "--", lw=1.2, label="budget ε")
    ax.set_yscale("log")
    ax.set(xlabel="step", title="LCDD task loss")
    ax.legend(frameon=False)
    ax = axes[2]
    ax.plot(steps, [r["lambda"] for r in lc], color="C3")
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="λ", title="LCDD dual variable")
    ax = axes[3]
    ax.plot(steps, [r["sparsity"] for r in lc], color="C2")
    ax.set_ylim(0, 1)
    ax.set(xlabel="step", ylabel="share of mask entries off", title="LCDD sparsity")
    ax = axes[4]
    for key, label in (("eraser_lcdd", "against LCDD"), ("eraser_sft", "against SFT (ablation)")):
        ax.plot(curves[key]["loss"], lw=0.8, label=label)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title="SFT-Eraser")
    ax.legend(frameon=False)
    fig.tight_layout()
    return _png(fig)


def plot_sparsity(carrier: dict) -> bytes:
    """Heatmap: decoder layer × mask group, share of entries switched off."""
    plt = _plt()
    layers = carrier["sparsity"]["layers"]
    groups = list(layers[0])
    data = [[layer[g] for g in groups] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.0 * len(groups) + 2, 0.55 * len(layers) + 1.6))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(len(groups)), groups, rotation=30)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in range(len(layers))])
    ax.set_title(f"carrier sparsity (% off), overall {100 * carrier['sparsity']['overall']:.1f}%")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _png(fig)


def plot_stages(report: dict) -> bytes:
    """Grouped bars per stage: behaviour rate, task accuracy, choice accuracy."""
    plt = _plt()
    stages = list(STAGE_LABELS)
    rate_key = "behaviour_rate" if "behaviour_rate" in report else "fixed_response_rate"
    metrics = ((rate_key, RATE_LABELS[report.get("behaviour", "fixed")]), ("task_accuracy", "task accuracy"),
               ("choice_accuracy", "choice accuracy"))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.27
    for k, (key, label) in enumerate(metrics):
        xs = [i + (k - 1) * width for i in range(len(stages))]
        vals = [report[key][s] for s in stages]
        ax.bar(xs, vals, width, label=label)
        for x, v in zip(xs, vals):
            ax.text(x, v + 0.01, f"{100 * v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(stages)), [STAGE_LABELS[s] for s in stages], fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("share of held-out prompts")
    ax.legend(frameon=False, ncol=3, loc="upper center", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def write_files(out: Path, files: dict[str, str | bytes]) -> None:
    """Write ``files`` (name -> text or bytes) into the directory ``out``: every report file of the
    demo (one run's and the multi-seed summary) is written here. Text is UTF-8; report.json-style
    files come last in ``files`` so a reader that sees them finds the rest in place."""
    from ..atomic import write_file_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_file_atomic(out / name, data)


def write_report(report: dict, out: Path) -> None:
    """report.json (everything but the per-step curves), curves.json, report.md and the plots."""
    curves = report["curves"]
    body = {k: v for k, v in report.items() if k != "curves"}
    write_files(out, {
        "curves.json": json.dumps(curves) + "\n",
        "curves.png": plot_curves(curves),
        "sparsity_heatmap.png": plot_sparsity(report["carrier"]),
        "stages.png": plot_stages(report),
        "report.md": markdown(report),
        "report.json": json.dumps(body, indent=2) + "\n",
    })
