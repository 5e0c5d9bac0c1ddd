"""``lcdd demo``: the whole method end to end on a CPU, in minutes, with no download."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .models_io import TINY_FAMILIES

#: What a run writes into --out; --force removes exactly these (nothing else of the user's).
OUTPUTS = ("base", "sft", "lcdd", "eraser", "report.json", "report.md", "curves.json",
           "curves.png", "sparsity_heatmap.png", "stages.png")


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    ours = [out / n for n in OUTPUTS if (out / n).exists()]
    if ours and not force:
        what = "a previous demo run (report.json)" if (out / "report.json").exists() else "demo outputs"
        raise FileExistsError(f"--out {out} already holds {what}; choose another --out, or pass --force "
                              "to replace that run")
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from ..demo.pipeline import preset
    from ..demo.report import summary_table

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # one bar per phase is ours; not one per model save and load
    cfg = preset(args.budget or ("quick" if args.quick else "full"), family=args.family, seed=args.seed,
                 overrides=args.set)
    cfg.base_from = args.base_from
    out = Path(args.out)
    if args.base_from and Path(args.out, "base").resolve() in (Path(args.base_from).resolve(),
                                                               *Path(args.base_from).resolve().parents):
        raise ValueError("--base-from is inside the run that --out would replace; copy it elsewhere first "
                         "or choose another --out")
    _prepare_out(out, args.force)
    from ..demo.pipeline import run_demo

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    report = run_demo(cfg, out, progress=not args.no_progress, log=log)
    c = report["carrier"]
    print(summary_table(report))
    print(f"\ncarrier: {100 * c['sparsity']['overall']:.1f}% of mask entries off, "
          f"{100 * c['fraction_of_projection_weights']:.1f}% of the projection weights, {c['bytes']:,} bytes")
    print("KL: " + ", ".join(f"{k} {v:.4f}" for k, v in report["kl"].items()))
    print(f"time: {report['seconds']['total']:.0f} s; report, plots and models in {out}/ (report.md)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole method end to end on a CPU: base model, SFT, LCDD, carrier, SFT-Eraser",
        description="Train a tiny base model on character tasks, fine-tune it to answer \"i don't know.\", "
                    "compress that into an LCDD carrier, reverse it with SFT-Eraser (and run the ablation "
                    "against the SFT model), and write report.json, report.md and plots into --out.")
    p.add_argument("--quick", action="store_true", help="the short run (about 3 minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", default="qwen3", choices=TINY_FAMILIES)
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output directory (default demo-out/)")
    p.add_argument("--force", action="store_true", help="replace a previous run in --out")
    p.add_argument("--base-from", default=None, metavar="DIR",
                   help="skip phase 0: reuse the base model of an earlier run (its DIR/base; same family, "
                        "seed and settings)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster when the cores are busy)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a setting of lcdd_kernels.demo.pipeline.DemoConfig, e.g. "
                        "--set eraser.max_norm=0.5 --set sft_steps=400 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--budget", default=None, help=argparse.SUPPRESS)  # "test": the test suite's tiny run
    p.set_defaults(func=run)
