"""Several seeds per behaviour: every run of ``lcdd demo --seeds N``, and their summary with 95%
confidence intervals and the ablation as a paired comparison (``summary.json``, ``summary.md``).

The base model and the world are the same in every run (as a pretrained model is); a seed changes
phases 1-3: the order of the SFT data, LCDD's masks and batches, the eraser's initial trigger.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .config import STAGES
from .report import RATE_LABELS, STAGE_LABELS, write_files
from .stats import mean_ci, paired

#: The goals a run of the demo should meet (the paper's pattern at toy scale).
GOALS = {"sft_rate_min": 0.95, "lcdd_rate_min": 0.95, "sparsity_min": 0.70, "lcdd_eraser_rate_max": 0.10}


def run_dir(out: Path, behaviour: str, seed: int) -> Path:
    return Path(out) / "runs" / behaviour / f"seed{seed}"


def load_reports(out: Path) -> list[dict]:
    """Every finished run's report.json under ``out/runs`` (behaviour, then seed order)."""
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in Path(out).glob("runs/*/seed*/report.json")]
    return sorted(reports, key=lambda r: (r["behaviour"], r["seed"]))


def _per_stage(reports, key):
    return {s: mean_ci([r[key][s] for r in reports]) for s in STAGES}


def summarize(reports: list[dict], command: str | None = None, time_s: float | None = None) -> dict:
    """Mean and 95% t-interval of every per-stage score, KL, sparsity and time per behaviour, and the
    ablation as paired comparisons across seeds (LCDD + eraser minus SFT + eraser) of every score."""
    by: dict[str, list[dict]] = {}
    for r in reports:
        by.setdefault(r["behaviour"], []).append(r)
    out = {"command": command, "time_s": time_s, "goals": GOALS, "behaviours": {}}
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        keys = ["behaviour_rate", "task_accuracy", "choice_accuracy",
                *[k for k in rs[0]["behaviour_scores"] if k != rs[0]["behaviour_rate_key"]]]
        rate = lambda r, s: r["behaviour_rate"][s]  # noqa: E731
        out["behaviours"][name] = {
            "seeds": [r["seed"] for r in rs],
            "description": rs[0]["behaviour_description"],
            "rate_key": rs[0]["behaviour_rate_key"],
            "scores": {k: _per_stage(rs, k) for k in keys},
            "kl": {k: mean_ci([r["kl"][k] for r in rs]) for k in rs[0]["kl"]},
            "sparsity": mean_ci([r["carrier"]["sparsity"]["overall"] for r in rs]),
            "time_s": mean_ci([r["time_s"] for r in rs]),
            "ablation": {k: paired([r[k]["lcdd_eraser"] for r in rs], [r[k]["sft_eraser"] for r in rs])
                         for k in keys},
            "goals_met": [{
                "seed": r["seed"],
                "sft_rate": rate(r, "sft") >= GOALS["sft_rate_min"],
                "lcdd_rate": rate(r, "lcdd") >= GOALS["lcdd_rate_min"],
                "sparsity": r["carrier"]["sparsity"]["overall"] >= GOALS["sparsity_min"],
                "lcdd_eraser_rate": rate(r, "lcdd_eraser") <= GOALS["lcdd_eraser_rate_max"],
            } for r in rs],
        }
    return out


def _cell(c: dict, pct: bool = True, digits: int = 3) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.{digits}f}")
    if c["mean"] is None or (isinstance(c["mean"], float) and math.isnan(c["mean"])):
        return "n/a"
    if c["low"] is None:
        return f(c["mean"])
    return f"{f(c['mean'])} [{f(c['low'])}, {f(c['high'])}]"


def summary_markdown(summary: dict) -> str:
    """Tables of means with 95% intervals, per behaviour, and the paired ablation."""
    lines = ["# lcdd demo over seeds", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`" + (f"; wall time {summary['time_s']:.0f} s."
                                                        if summary.get("time_s") is not None else "."), ""]
    lines += ["Percent of the held-out prompts: mean over seeds [95% t-interval]. Ablation: LCDD + eraser "
              "minus SFT + eraser, paired by seed, with the paired t-test's p.", ""]
    for name, b in summary["behaviours"].items():
        keys = list(b["scores"])
        heads = [RATE_LABELS[name] if k == "behaviour_rate" else k.replace("_", " ") for k in keys]
        lines += [f"## {name}: {b['description']} (seeds {', '.join(map(str, b['seeds']))})", "",
                  "| stage | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(keys)]
        for s, label in STAGE_LABELS.items():
            lines.append(f"| {label} | " + " | ".join(_cell(b["scores"][k][s]) for k in keys) + " |")
        lines += ["", "| KL | mean [95% CI] |", "|---|---:|"]
        lines += [f"| {k.replace('_vs_', ' ‖ ')} | {_cell(v, pct=False)} |" for k, v in b["kl"].items()]
        lines += ["", f"Carrier sparsity {_cell(b['sparsity'])}%; time per run {_cell(b['time_s'], pct=False, digits=0)} s.",
                  "", "| ablation (LCDD + eraser − SFT + eraser) | difference [95% CI] | p |", "|---|---:|---:|"]
        for k, p in b["ablation"].items():
            pv = "n/a" if p["p"] is None else f"{p['p']:.3g}"
            lines.append(f"| {RATE_LABELS[name] if k == 'behaviour_rate' else k.replace('_', ' ')} | "
                         f"{_cell(p)} | {pv} |")
        met = b["goals_met"]
        lines += ["", "Goals met (seeds of " + str(len(met)) + "): " + ", ".join(
            f"{g} {sum(m[g] for m in met)}" for g in ("sft_rate", "lcdd_rate", "sparsity", "lcdd_eraser_rate")),
            ""]
    return "\n".join(lines)


def write_summary(out: Path, summary: dict) -> None:
    write_files(out, {"summary.md": summary_markdown(summary),
                      "summary.json": json.dumps(summary, indent=2) + "\n"})


def run_seeds(make_cfg, behaviours, seeds, out, progress=True, log=print, command=None) -> dict:
    """Run the demo for every behaviour and seed (``make_cfg(behaviour, seed) -> DemoConfig``) into
    ``out/runs/<behaviour>/seed<k>``; after each run, ``out/summary.{json,md}`` covers the runs so far."""
    from .pipeline import run_demo

    t0 = time.perf_counter()
    summary = {}
    # Seeds outer: a run stopped early still has every behaviour on its first seeds.
    for seed in seeds:
        for behaviour in behaviours:
            log(f"== behaviour {behaviour}, seed {seed}")
            run_demo(make_cfg(behaviour, seed), run_dir(out, behaviour, seed), progress=progress, log=log)
            summary = summarize(load_reports(out), command, round(time.perf_counter() - t0, 1))
            write_summary(out, summary)
    return summary
