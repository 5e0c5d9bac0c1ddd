"""``lcdd bench <suite>``: providers side by side in one run, results as JSON rows."""

from __future__ import annotations

import importlib

# suite name -> module in lcdd_kernels.bench providing add_arguments(parser) and run(args)
# ("plot" is no suite: it draws any suite's results file). An op's suite is also named for the
# op: "masked-delta" is "training" under the op's name; "gather" runs the capture groups that
# "eraser" runs next to its whole-step groups.
SUITES = {
    "training": "masked_delta",
    "masked-delta": "masked_delta",
    "gather": "gather",
    "eraser": "eraser",
    "carrier": "carrier",
    "lcdd-step": "lcdd_step",
    "serving": "serving",
    "adapter-sizes": "adapter_sizes",
    "plot": "plot",
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark suite (providers side by side)")
    suites = p.add_subparsers(dest="suite", metavar="SUITE")
    suites.required = True
    for name, module in SUITES.items():
        mod = importlib.import_module(f"lcdd_kernels.bench.{module}")
        sp = suites.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
