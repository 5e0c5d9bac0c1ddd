"""``lcdd demo``: the whole method end to end on a CPU, in minutes, with no download."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .models_io import TINY_FAMILIES

#: What a run writes into --out; --force removes exactly these (nothing else of the user's).
OUTPUTS = ("base", "sft", "lcdd", "eraser", "report.json", "report.md", "curves.json",
           "curves.png", "sparsity_heatmap.png", "stages.png", "runs", "summary.json", "summary.md")


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    ours = [out / n for n in OUTPUTS if (out / n).exists()]
    if ours and not force:
        what = ("a previous demo run (report.json)" if (out / "report.json").exists()
                else "a previous multi-seed run (summary.json)" if (out / "summary.json").exists()
                else "demo outputs")
        raise FileExistsError(f"--out {out} already holds {what}; choose another --out, or pass --force "
                              "to replace that run")
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _command(args) -> str:
    """The command line of this run, for the summary (options at their defaults left out)."""
    parts = ["lcdd demo"]
    if args.budget:
        parts.append(f"--budget {args.budget}")
    elif args.quick:
        parts.append("--quick")
    parts += [f"--behaviour {args.behaviour}", f"--seeds {args.seeds}"]
    if args.seed:
        parts.append(f"--seed {args.seed}")
    if args.family != "qwen3":
        parts.append(f"--family {args.family}")
    if args.train_base:
        parts.append("--train-base")
    if args.threads:
        parts.append(f"--threads {args.threads}")
    parts += [f"--set {s}" for s in args.set]
    return " ".join(parts)


def _summarize(args) -> int:
    """--summarize: one summary of the finished runs of several multi-seed runs (e.g. one per behaviour,
    run side by side)."""
    import json

    from ..demo.seeds import load_reports, summarize, write_summary

    reports, sources = [], []
    for d in args.summarize:
        found = load_reports(Path(d))
        if not found:
            raise FileNotFoundError(f"--summarize {d}: no runs/<behaviour>/seed<k>/report.json there")
        reports += found
        prev = Path(d) / "summary.json"
        meta = json.loads(prev.read_text(encoding="utf-8")) if prev.is_file() else {}
        sources.append({"dir": str(d), "command": meta.get("command"), "time_s": meta.get("time_s"),
                        "runs": len(found)})
    seen = [(r["behaviour"], r["seed"]) for r in reports]
    if len(set(seen)) != len(seen):
        raise ValueError("--summarize: the directories hold the same behaviour and seed more than once")
    out = Path(args.out)
    if (out / "summary.json").exists() and not args.force:
        raise FileExistsError(f"--out {out} already holds a summary.json; pass --force to replace it")
    summary = summarize(reports, command="; ".join(s["command"] or "?" for s in sources),
                        time_s=max((s["time_s"] or 0.0) for s in sources))
    summary["sources"] = sources
    write_summary(out, summary)
    print(f"{len(reports)} runs summarised into {out}/summary.md")
    return 0


def run(args) -> int:
    import time

    import torch
    from transformers.utils import logging as hf_logging

    from ..demo.behaviours import BEHAVIOURS
    from ..demo.config import preset
    from ..demo.report import summary_table

    t0 = time.perf_counter()
    if args.summarize:
        return _summarize(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    hf_logging.disable_progress_bar()  # one bar per phase is ours; not one per model save and load
    behaviours = list(BEHAVIOURS) if args.behaviour == "all" else [args.behaviour]

    def make_cfg(behaviour, seed):
        cfg = preset(args.budget or ("quick" if args.quick else "full"), family=args.family, seed=seed,
                     overrides=[f"behaviour={behaviour}", *args.set])
        cfg.base_from = args.base_from
        cfg.train_base = cfg.train_base or args.train_base
        return cfg

    make_cfg(behaviours[0], args.seed)  # bad settings fail here, before anything is removed
    out = Path(args.out)
    if args.base_from and Path(args.out).resolve() in (Path(args.base_from).resolve(),
                                                       *Path(args.base_from).resolve().parents):
        raise ValueError("--base-from is inside the run that --out would replace; copy it elsewhere first "
                         "or choose another --out")
    _prepare_out(out, args.force)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if len(behaviours) > 1 or args.seeds > 1:
        from ..demo.seeds import run_seeds

        seeds = list(range(args.seed, args.seed + args.seeds))
        summary = run_seeds(make_cfg, behaviours, seeds, out, progress=not args.no_progress, log=log,
                            command=_command(args))
        for name, b in summary["behaviours"].items():
            r = b["scores"]["behaviour_rate"]
            print(f"{name}: behaviour rate (mean over {len(b['seeds'])} seeds) " + ", ".join(
                f"{s} {100 * r[s]['mean']:.1f}" for s in r))
        print(f"time: {time.perf_counter() - t0:.0f} s; summary in {out}/summary.md, runs in {out}/runs/")
        return 0

    from ..demo.pipeline import run_demo

    report = run_demo(make_cfg(behaviours[0], args.seed), out, progress=not args.no_progress, log=log)
    c = report["carrier"]
    print(summary_table(report))
    print(f"\ncarrier: {100 * c['sparsity']['overall']:.1f}% of mask entries off, "
          f"{100 * c['fraction_of_projection_weights']:.1f}% of the projection weights, {c['bytes']:,} bytes")
    print("KL: " + ", ".join(f"{k} {v:.4f}" for k, v in report["kl"].items()))
    print(f"time: {report['time_s']:.0f} s (time_s in report.json); report, plots and models in {out}/ (report.md)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole method end to end on a CPU: base model, SFT, LCDD, carrier, SFT-Eraser",
        description="Train a tiny base model on character tasks, fine-tune it to answer \"i don't know.\", "
                    "compress that into an LCDD carrier, reverse it with SFT-Eraser (and run the ablation "
                    "against the SFT model), and write report.json, report.md and plots into --out.")
    p.add_argument("--quick", action="store_true",
                   help="the short run (109 s on 2 idle CPU cores with the shipped base model; time_s in report.json)")
    p.add_argument("--behaviour", default="fixed", choices=("fixed", "refusal", "style", "all"),
                   help="what SFT teaches: fixed (always \"i don't know.\"), refusal (refuse the 'reverse' "
                        "tasks, answer the rest), style (answers wrapped in a marker), or all three")
    p.add_argument("--seed", type=int, default=0, help="seed of phases 1-3 (the first one with --seeds)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run seeds SEED..SEED+N-1 per behaviour into DIR/runs/ and summarise them with 95%% "
                        "confidence intervals and the paired ablation (DIR/summary.md)")
    p.add_argument("--train-base", action="store_true",
                   help="train the base model (phase 0) instead of using the one the package ships")
    p.add_argument("--family", default="qwen3", choices=TINY_FAMILIES)
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output directory (default demo-out/)")
    p.add_argument("--force", action="store_true", help="replace a previous run in --out")
    p.add_argument("--base-from", default=None, metavar="DIR",
                   help="skip phase 0: reuse the base model of an earlier run (its DIR/base; same family, "
                        "seed and settings)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster when the cores are busy)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a setting of lcdd_kernels.demo.config.DemoConfig, e.g. "
                        "--set eraser.max_norm=0.5 --set sft_steps=400 (repeatable)")
    p.add_argument("--summarize", nargs="+", default=None, metavar="DIR",
                   help="train nothing: summarise the finished runs of earlier --seeds runs (their DIR/runs/) "
                        "into --out/summary.md and summary.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--budget", default=None, help=argparse.SUPPRESS)  # "test": the test suite's tiny run
    p.set_defaults(func=run)
