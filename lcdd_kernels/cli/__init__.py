"""The ``lcdd`` command line. Each subcommand lives in its own module of this package and
registers itself through ``register(subparsers)``; this table is the only list of them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a laptop CPU that
# is also running other work, spinning threads wait at every barrier for a descheduled peer
# (measured: one masked-delta projection 11x slower with two spinning threads on a loaded 2-core
# machine, 1.0x with PASSIVE). An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# module (in lcdd_kernels.cli) -> what it adds
_MODULES = {
    "env": "lcdd env: the environment report to paste into bug reports",
    "bench": "lcdd bench <suite>: benchmarks, providers side by side",
    "erase": "lcdd erase: optimise an SFT-Eraser trigger (SPEC §5)",
    "eval": "lcdd eval: fixed-response rate, KL and choice accuracy, with or without a trigger (SPEC §6)",
    "train": "lcdd train-sft / train-lcdd: phase 1 SFT and phase 2 LCDD training (SPEC §3)",
    "carrier": "lcdd extract / inspect: write a carrier from trained weights and masks, show one (SPEC §4)",
    "sign": "lcdd sign: sign a carrier with an elliptic-curve key; --verify PUBLIC.pem checks it on load",
    "export": "lcdd export: a carrier as a PEFT adapter (exact LoRA or SHiRA), for PEFT and vLLM",
    "demo": "lcdd demo: the whole method end to end on a CPU (base, SFT, LCDD, carrier, SFT-Eraser)",
    "check_kernels": "lcdd check-kernels: every GPU kernel compiled for sm_90/sm_80, no compile error, no spill",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcdd", description="lcdd-kernels: LCDD carriers, training, serving and SFT-Eraser")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError) as e:
        # Users get the message that names the problem, not a traceback.
        print(f"lcdd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
