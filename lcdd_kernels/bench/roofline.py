"""Roofline floors of every shape that ``lcdd bench training`` and ``lcdd bench carrier`` time on
a GPU, per provider, and how close a measured run came to them.

Per (shape, provider, mode): the FLOPs and the bytes the provider's algorithm must do and move
at least (every operand read once, every result written once; the extra passes a provider's
design implies, such as parametrize writing and re-reading W_eff, are counted for that provider),
and the floor time ``max(flops / peak_flops, bytes / peak_bandwidth)``. Peaks are those measured
on the team's H200: bf16 dense GEMM about 790 TFLOP/s, device copy about 4.3 TB/s.

    python -m lcdd_kernels.bench.roofline write  [--out benchmarks/results/roofline-h200.json]
    python -m lcdd_kernels.bench.roofline compare RESULTS.json... [--roofline FILE] [--out FILE]

``compare`` (run by benchmarks/gpu_check.sh) prints every measured row as a fraction of its floor
(``floor_ms / ms_median``: 1.0 is the roofline, 0.25 a quarter of it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

PEAK_FLOPS = 790e12  # bf16 dense GEMM on the team's H200
PEAK_BYTES_S = 4.3e12  # device copy on the team's H200
DTYPE_BYTES = 2  # the GPU benchmarks run bf16
DEFAULT_FILE = "benchmarks/results/roofline-h200.json"
_MODES = ("forward", "backward")


def _eager(provider: str) -> str:
    """A ``*-compiled`` provider has its eager provider's floor: compiling the same call moves no
    fewer bytes and does no fewer FLOPs."""
    return provider.removesuffix("-compiled")


def _linear_costs(provider: str, t: int, n: int, k: int, e: int = DTYPE_BYTES) -> dict:
    """{mode: (flops, bytes)} of one masked-delta / dense projection, forward and backward."""
    provider = _eager(provider)
    gemm = 2 * t * n * k
    act_fwd = e * (t * k + t * n)  # x read, y written
    act_bwd = e * (t * n + 2 * t * k)  # G read, X read, dx written
    mask = e * (n + k)
    if provider == "dense":  # nn.Linear: W read in forward; backward reads W, writes dW
        return {"forward": (gemm, act_fwd + e * n * k), "backward": (2 * gemm, act_bwd + 2 * e * n * k)}
    if provider in ("lcdd", "lcdd-fused"):  # W and B read once per pass; W_eff never stored
        return {"forward": (gemm, act_fwd + 2 * e * n * k + mask),
                "backward": (2 * gemm, act_bwd + 3 * e * n * k + 2 * mask)}  # W, B read; dW written
    if provider == "lcdd-split":  # W_eff written and re-read by cuBLAS in forward and for dx
        return {"forward": (gemm, act_fwd + 4 * e * n * k + mask),
                "backward": (2 * gemm, act_bwd + 7 * e * n * k + 2 * mask)}  # + P written and re-read
    if provider == "parametrize":  # W_eff built densely in fp32, cast, then a plain linear
        build = 2 * e * n * k + 4 * n * k + 4 * n * k + e * n * k  # read W, B; write fp32; read it; write cast
        return {"forward": (gemm, act_fwd + build + e * n * k),
                "backward": (2 * gemm, act_bwd + 2 * e * n * k + 4 * 4 * n * k)}  # dW_eff through the fp32 graph
    raise ValueError(f"no cost model for provider {provider!r}")


def _swiglu_costs(provider: str, t: int, f: int, k: int, e: int = DTYPE_BYTES) -> dict:
    """Gate and up projections plus silu(g)·u; the fused op also writes (g, u) for backward."""
    provider = _eager(provider)
    two = [_linear_costs(provider, t, f, k, e) for _ in range(2)]
    fwd = (two[0]["forward"][0] + two[1]["forward"][0], two[0]["forward"][1] + two[1]["forward"][1])
    bwd = (two[0]["backward"][0] + two[1]["backward"][0], two[0]["backward"][1] + two[1]["backward"][1])
    if provider in ("lcdd", "lcdd-fused"):  # one x read for both; gu written; h written
        fwd = (fwd[0], fwd[1] - e * t * k + e * t * f)
        bwd = (bwd[0], bwd[1] - 2 * e * t * k + e * 2 * t * f)  # dh read, gu read, dgu in place
    else:  # g and u written, read by silu·mul, h written (backward: dh, g, u read, dg, du written)
        fwd = (fwd[0], fwd[1] + 2 * e * t * f)
        bwd = (bwd[0], bwd[1] + 3 * e * t * f + 2 * e * t * f)
    return {"forward": fwd, "backward": bwd}


def _carrier_costs(provider: str, case: dict, e: int = DTYPE_BYTES) -> tuple[int, int]:
    provider = _eager(provider)
    t, n, k, s, mix = case["T"], case["N"], case["K"], case["s"], case["mix"]
    rows, cols = round((1 - s) * n), round((1 - s) * k)
    used = min(mix, t)
    base_flops, base_bytes = 2 * t * n * k, e * (n * k + t * k + t * n)
    carrier_bytes = used * (e * rows * cols + 4 * (rows + cols))
    carrier_flops = 2 * t * rows * cols if used else 0  # every token through its own carrier
    if provider == "base":
        return base_flops, base_bytes
    if provider in ("lcdd", "checked", "plan"):  # base GEMM + each used delta once (one code, two call paths)
        return base_flops + carrier_flops, base_bytes + carrier_bytes
    if provider == "merged":  # one dense copy per carrier in use
        return base_flops, base_bytes + max(used - 1, 0) * e * n * k
    if provider == "naive":  # index_select writes x[:, cols], mm writes the part, index_add reads/writes y
        return base_flops + carrier_flops, base_bytes + carrier_bytes + e * (2 * t * cols + 3 * t * rows) * (used > 0)
    raise ValueError(f"no cost model for provider {provider!r}")


def _row(suite, case, provider, mode, flops, nbytes) -> dict:
    floor = max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES_S)
    return {"suite": suite, "group": case["group"], "provider": provider, "mode": mode,
            **{k: case[k] for k in ("op", "model", "proj", "T", "N", "K", "s", "mix") if k in case},
            "flops": flops, "bytes": nbytes, "floor_ms": floor * 1e3,
            "bound": "compute" if flops / PEAK_FLOPS >= nbytes / PEAK_BYTES_S else "memory"}


def _unique(cases):
    seen = {}
    for c in cases:
        seen.setdefault(c["group"], c)
    return list(seen.values())


def table() -> list[dict]:
    """Every GPU-plan shape of the training and carrier suites, every provider and mode."""
    from . import carrier, masked_delta

    rows = []
    plans = [v for (dev, _), v in masked_delta.PLANS.items() if dev == "cuda"]
    cases = _unique(c for models, tokens in plans for c in masked_delta.cases(models, tokens))
    for case in cases:
        for provider in masked_delta.PROVIDERS + masked_delta.DESIGN_PROVIDERS:
            cost = (_linear_costs if case["op"] == "linear" else _swiglu_costs)(provider, case["T"], case["N"], case["K"])
            full = tuple(a + b for a, b in zip(cost["forward"], cost["backward"]))
            for mode, (fl, by) in (*cost.items(), ("full", full)):
                rows.append(_row("training", case, provider, mode, fl, by))
    plans = [v for (dev, _), v in carrier.PLANS.items() if dev == "cuda"]
    cases = _unique(c for models, projs, tokens, sparsities, mixes, _ in plans
                    for c in carrier.cases(models, tokens, sparsities, mixes, projs))
    for case in cases:
        for provider in carrier.PROVIDERS:
            rows.append(_row("carrier", case, provider, "forward", *_carrier_costs(provider, case)))
    return rows


def write(path: str = DEFAULT_FILE) -> dict:
    doc = {"schema": "lcdd-roofline-1", "device": "H200", "peak_flops": PEAK_FLOPS, "peak_bytes_per_s": PEAK_BYTES_S,
           "dtype_bytes": DTYPE_BYTES, "note": __doc__.strip().splitlines()[0], "rows": table()}
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    head = json.dumps({k: v for k, v in doc.items() if k != "rows"})[:-1]
    p.write_text(head + ', "rows": [\n' + ",\n".join(json.dumps(r) for r in doc["rows"]) + "\n]}\n")
    return doc


def compare(results: list[str], roofline: str = DEFAULT_FILE) -> list[dict]:
    """Measured rows (bench results files) next to their floors: ``of_roofline`` = floor / measured."""
    floors = {(r["suite"], r["group"], r["provider"], r["mode"]): r for r in json.loads(pathlib.Path(roofline).read_text())["rows"]}
    out = []
    for path in results:
        p = pathlib.Path(path)
        if not p.exists():
            print(f"roofline: {path} not there (its stage did not run); skipped")
            continue
        no_floor = set()
        for r in json.loads(p.read_text())["rows"]:
            key = (r.get("suite"), r.get("group"), r.get("provider"), r.get("mode"))
            f = floors.get(key)
            ms = r.get("ms_median")
            if not ms:
                continue
            if f is None:
                no_floor.add(key)
                continue
            out.append({"suite": r["suite"], "group": r["group"], "provider": r["provider"], "mode": r["mode"],
                        "ms": ms, "floor_ms": f["floor_ms"], "bound": f["bound"], "of_roofline": f["floor_ms"] / ms})
        if no_floor:  # a shape or provider the table does not know: regenerate it (``write``) if it should
            print(f"roofline: {path}: {len(no_floor)} measured rows have no floor in {roofline}, e.g. "
                  + ", ".join("/".join(map(str, k)) for k in sorted(no_floor, key=str)[:3]))
    return out


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lcdd_kernels.bench.roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the floors of every GPU bench shape")
    w.add_argument("--out", default=DEFAULT_FILE)
    c = sub.add_parser("compare", help="measured results as fractions of their floors")
    c.add_argument("results", nargs="+")
    c.add_argument("--roofline", default=DEFAULT_FILE)
    c.add_argument("--out", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.cmd == "write":
        doc = write(args.out)
        print(f"roofline: {len(doc['rows'])} rows -> {args.out}")
        return 0
    rows = compare(args.results, args.roofline)
    print(f"{'suite':9} {'group':44} {'provider':12} {'mode':9} {'ms':>9} {'floor ms':>9} {'of floor':>8}  bound")
    for r in rows:
        print(f"{r['suite']:9} {r['group'][:44]:44} {r['provider']:12} {r['mode']:9} {r['ms']:9.3f} "
              f"{r['floor_ms']:9.3f} {r['of_roofline']:8.2f}  {r['bound']}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
