"""``lcdd check-kernels``: compile every GPU kernel of the package for sm_90 and sm_80 (no GPU
needed) and fail on any compile error or register spill. See lcdd_kernels/kernel_check."""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtypes", default="float32,float16,bfloat16", help="comma-separated (default: all three)")
    p.add_argument("--archs", default="90,80", help="compute capabilities, comma-separated (default: 90,80)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: one per CPU)")
    p.add_argument("--cache-dir", default="build/kernel-check",
                   help="results cache (keyed by kernel source, Triton version and launch); '' for none")
    p.add_argument("--out", default=None, help="write the JSON table here")
    p.add_argument("--summary", default=None, help="write the readable summary here too")
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this (coverage not judged)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources (nvcc)")
    p.add_argument("--fixed-configs-only", action="store_true",
                   help="record only with LCDD_TRITON_AUTOTUNE=0 (one fixed config per autotuned kernel)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..kernel_check import check_kernels

    result = check_kernels(
        dtypes=tuple(d.strip() for d in args.dtypes.split(",") if d.strip()),
        archs=tuple(int(a) for a in args.archs.split(",") if a.strip()),
        jobs=args.jobs, cache_dir=args.cache_dir or None, out_json=args.out, out_summary=args.summary,
        kernels=args.kernel, cuda=not args.no_cuda,
        autotune_modes=("0",) if args.fixed_configs_only else ("1", "0"),
    )
    return 0 if result["ok"] else 1


def register(sub) -> None:
    p = sub.add_parser("check-kernels", help=__doc__.strip().splitlines()[0])
    add_arguments(p)


def main(argv=None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    p = argparse.ArgumentParser(prog="python -m lcdd_kernels.kernel_check", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args)
