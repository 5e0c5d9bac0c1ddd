"""What every suite's command shares: its options, the device and dtype they give, the --out check
before anything runs, and the ending (table, targets, results file, plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from .results import ResultsFile
from .tables import COLUMNS, format_table
from .targets import Target, check_targets, format_targets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def csv_of(kind):
    """An argparse type: a comma list of ``kind`` values, as a tuple."""
    return lambda s: tuple(kind(v) for v in s.split(",") if v)


def add_common_arguments(p, default_budget: float = 1.0) -> None:
    """Options every suite takes."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true", help="fewer shapes and tokens: a couple of minutes")
    p.add_argument("--out", default=None, help="write the rows to this JSON file")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--append", action="store_true", help="add this run's rows to an existing --out")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the ratios into this PNG")
    p.add_argument("--budget", type=float, default=default_budget,
                   help="CPU: seconds of repeats per measurement (CUDA uses do_bench's own)")
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default: torch's); 1 gives steadier times on a busy machine")


def resolve_device_dtype(args) -> tuple[str, torch.dtype]:
    """--device / --dtype with their defaults; also applies --threads."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch here; use --device cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return device, dtype


def open_results(args) -> ResultsFile | None:
    """Checks --out before anything runs (so a refusal costs nothing)."""
    if args.plot and Path(args.plot).exists() and not args.force:
        raise FileExistsError(f"{args.plot} exists; pass --force to replace it")
    return ResultsFile(args.out, force=args.force, append=args.append) if args.out else None


def report(rows: list[dict], targets: Sequence[Target], results: ResultsFile | None, plot: str | None = None,
           columns: Sequence[tuple[str, Callable[[dict], str]]] = COLUMNS) -> int:
    """Every suite's ending: the table, the targets as pass/miss, the results file, the plot.
    Returns the command's exit status: 1 when any measurement failed (its row has ``error``)."""
    print(format_table(rows, columns))
    print()
    checks = check_targets(rows, targets)
    print(format_targets(checks))
    if results is not None:
        results.write(rows, checks)
        print(f"wrote {len(rows)} rows to {results.path}")
    if plot:
        from .plot import plot_rows

        print(f"wrote {plot_rows(rows, plot)}")
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(rows)} measurements failed (see the error column)")
    return 1 if failed else 0
