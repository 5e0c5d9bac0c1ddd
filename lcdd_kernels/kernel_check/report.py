"""The check's table (one row per kernel x launch x arch) and its readable summary.

A row's ``status``: ``error`` (did not compile, or cannot launch), ``spill`` (ptxas reports spill
stores/loads, or the SASS has local loads/stores) or ``ok``. The report is ``ok`` only when every
row is, every kernel of the package was reached, and no scenario failed on the host.
"""

from __future__ import annotations

import collections
import json
import pathlib

_METRICS = ("registers", "spill_store_bytes", "spill_load_bytes", "stack_bytes", "local_loads", "local_stores",
            "shared_bytes", "num_warps", "num_stages", "mma", "blocks_per_sm", "occupancy")


def status(result: dict) -> str:
    if "error" in result:
        return "error"
    if result["spill_store_bytes"] or result["spill_load_bytes"] or result["local_loads"] or result["local_stores"]:
        return "spill"
    return "ok"


def row(launch, cc: int, result: dict, cached: bool) -> dict:
    return {
        "kernel": launch.kernel,
        "module": launch.module,
        "dtype": launch.origin.split()[0],
        "arch": f"sm_{cc}",
        "config": launch.config,
        "scenario": launch.origin,
        "status": status(result),
        **{k: result[k] for k in _METRICS if k in result},
        **({"error": result["error"]} if "error" in result else {}),
        "signature": result.get("signature"),
        "aligned": result.get("aligned"),
        "compile_s": result.get("compile_s"),
        "cached": cached,
    }


def build(rows, cuda_rows, *, uncovered, problems, triton, python, seconds, cache_dir=None) -> dict:
    rows = sorted(rows, key=lambda r: (r["module"], r["kernel"], r["dtype"], r["arch"], json.dumps(r["config"])))
    counts = collections.Counter(r["status"] for r in rows)
    cuda_bad = [r for r in cuda_rows if r["status"] not in ("ok", "skipped")]
    return {
        "ok": not (counts["error"] or counts["spill"] or uncovered or problems or cuda_bad),
        "triton": triton,
        "python": python,
        "seconds": round(seconds, 1),
        "cache_dir": cache_dir,
        "counts": dict(counts),
        "uncovered": uncovered,
        "problems": problems,
        "triton_rows": rows,
        "cuda_rows": cuda_rows,
    }


def write_json(result: dict, path: str) -> None:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(p)


def _config_text(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def summary(result: dict) -> str:
    rows = result["triton_rows"]
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["dtype"], r["arch"])].append(r)
    lines = [f"Triton {result['triton']}: {len(rows)} compiles, " +
             ", ".join(f"{v} {k}" for k, v in sorted(result["counts"].items())) + f" ({result['seconds']}s)",
             "",
             f"{'kernel':36} {'dtype':9} {'arch':6} {'launches':>8} {'err':>4} {'spill':>5} {'regs max':>8} "
             f"{'smem KiB':>8} {'occ min':>7}  mma"]
    for (kernel, dtype, arch), rs in sorted(groups.items()):
        good = [r for r in rs if r["status"] != "error"]
        n_err = sum(r["status"] == "error" for r in rs)
        n_spill = sum(r["status"] == "spill" for r in rs)
        regs = max((r["registers"] for r in good), default=0)
        smem = max((r["shared_bytes"] for r in good), default=0) / 1024
        occ = min((r["occupancy"] for r in good), default=0)
        mma = ",".join(sorted({r["mma"] for r in good})) or "-"
        lines.append(f"{kernel:36} {dtype:9} {arch:6} {len(rs):>8} {n_err:>4} {n_spill:>5} {regs:>8} "
                     f"{smem:>8.1f} {occ:>7.3f}  {mma}")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines += ["", "Failing launches:"]
        for r in bad:
            what = (r["error"].splitlines()[0] if r["status"] == "error" else
                    f"{r['spill_store_bytes']} B spill stores, {r['spill_load_bytes']} B spill loads, "
                    f"{r['local_loads']} LDL / {r['local_stores']} STL, {r['registers']} registers")
            lines.append(f"  {r['status'].upper():5} {r['kernel']} {r['dtype']} {r['arch']} "
                         f"[{_config_text(r['config'])}]: {what}")
    if result["cuda_rows"]:
        lines += ["", f"CUDA sources (nvcc -Xptxas -v): {len(result['cuda_rows'])} functions x archs"]
        for r in result["cuda_rows"]:
            if r["status"] != "ok" or r.get("spill_store_bytes"):
                lines.append(f"  {r['status'].upper():5} {r['function']} {r['arch']}: {r.get('error') or ''}"
                             f"{r.get('registers', '?')} registers, {r.get('spill_store_bytes', '?')} B spill stores, "
                             f"{r.get('spill_load_bytes', '?')} B spill loads")
        worst = max((r.get("registers", 0) for r in result["cuda_rows"]), default=0)
        lines.append(f"  max registers {worst}; "
                     f"{sum(r['status'] == 'ok' for r in result['cuda_rows'])} of {len(result['cuda_rows'])} clean")
    for u in result["uncovered"]:
        lines.append(f"UNCOVERED kernel {u}: no scenario of lcdd_kernels/kernel_check/scenarios.py launches it "
                     f"and no launched kernel calls it; add the call that launches it there")
    for p in result["problems"]:
        lines.append(f"PROBLEM {p}")
    lines.append("")
    lines.append("check-kernels: OK" if result["ok"] else "check-kernels: FAILED")
    return "\n".join(lines) + "\n"
