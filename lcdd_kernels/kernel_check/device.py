"""On a GPU: run the check's scenarios for real and compare what the driver reports for every
kernel Triton compiled (``CompiledKernel.n_regs`` / ``n_spills`` once loaded) with what the check
predicted for the same kernel, constexprs and config (its JSON table, ``lcdd check-kernels --out``).

    python -m lcdd_kernels.kernel_check.device TABLE.json [--dtypes bfloat16] [--out FILE]

Exit status 1 when a kernel spills on the device, or when its register count differs from the
table's (the check then does not predict what users get: a ptxas or Triton version apart).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _compiled(fn):
    """Every CompiledKernel in a JITFunction's per-device caches (Triton 3.5 to 3.9)."""
    for caches in getattr(fn, "device_caches", {}).values():
        for kernel in caches[0].values():
            yield kernel.result() if hasattr(kernel, "result") else kernel


def matches(row: dict, fn, kernel) -> bool:
    """Is ``row`` of the check's table the launch that a device compiled into ``kernel``: same
    kernel, constexprs and config, signature and specialisation?"""
    if row["kernel"] != fn.__name__ or row.get("status") == "error":
        return False
    names = [p.name for p in fn.params]
    constants = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in kernel.src.constants.items()}
    meta = kernel.metadata
    for k, v in row["config"].items():
        if k in names:
            if constants.get(k, object()) != v and str(constants.get(k)) != str(v):
                return False
        elif k in ("num_warps", "num_stages") and getattr(meta, k, v) != v:
            return False
    sig = {k: v for k, v in kernel.src.signature.items() if v != "constexpr"}
    if sig != (row.get("signature") or sig):
        return False
    # Launches of one config that differ in alignment or divisibility are different compiles.
    from .compile import aligned

    return row.get("aligned") is None or aligned(fn, kernel.src.attrs) == row["aligned"]


def compare(table: str, dtypes=("bfloat16",)) -> dict:
    import torch

    from . import scenarios
    from .compile import jit_function

    rows = [r for r in json.loads(pathlib.Path(table).read_text())["triton_rows"] if r["arch"] == "sm_90"]
    scenarios._DEVICE = "cuda"
    failures = []
    for dtype in dtypes:
        for name, run in scenarios.scenarios(dtype):
            try:
                run()
            except Exception as e:
                failures.append(f"{dtype} {name}: {type(e).__name__}: {e}")
    torch.cuda.synchronize()
    out = []
    for module, kernel_name in sorted({(r["module"], r["kernel"]) for r in rows}):
        fn = jit_function(module, kernel_name)
        for k in _compiled(fn):
            k._init_handles()
            match = [r for r in rows if matches(r, fn, k)]
            out.append({"kernel": kernel_name, "device_regs": k.n_regs, "device_spills": k.n_spills,
                        "check_regs": [r["registers"] for r in match] or None,
                        "config": match[0]["config"] if match else None,
                        "agree": bool(match) and all(r["registers"] == k.n_regs for r in match)})
    bad = [r for r in out if r["device_spills"] or not r["agree"]]
    return {"ok": not bad and not failures, "kernels": out, "mismatches": bad, "scenario_failures": failures}


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lcdd_kernels.kernel_check.device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    res = compare(args.table, tuple(args.dtypes.split(",")))
    n = len(res["kernels"])
    agree = sum(r["agree"] for r in res["kernels"])
    print(f"device vs check: {n} compiled kernels, {agree} with the check's register count, "
          f"{sum(bool(r['device_spills']) for r in res['kernels'])} spilling on the device")
    for r in res["mismatches"]:
        print(f"  MISMATCH {r['kernel']} [{r['config']}]: device {r['device_regs']} regs / {r['device_spills']} "
              f"spills, check {r['check_regs']}")
    for f in res["scenario_failures"]:
        print(f"  SCENARIO FAILED {f}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(_main())
