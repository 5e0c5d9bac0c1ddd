"""Run the check: record launches, compile them in a process pool (with a cache), report."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib
import json
import multiprocessing
import os
import pathlib
import sys
import time
import warnings

from . import discovery, report

ARCHS = (90, 80)
PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_SOURCES = ((str(PACKAGE_ROOT), "lcdd_kernels"),)
DEFAULT_SCENARIOS = ("lcdd_kernels.kernel_check.scenarios",)
#: Autotune modes of ops/masked_delta_triton.py: tuned (the default) and LCDD_TRITON_AUTOTUNE=0
#: (one fixed config, used by the GPU test run). Each is recorded in its own process.
AUTOTUNE_MODES = ("1", "0")


def _init_worker(env: dict) -> None:
    # Before anything defines a kernel: compile for real (tests run with TRITON_INTERPRET=1).
    # Every compile runs ptxas (its report is the measurement): Triton's own cache would skip it;
    # this check's cache is the one that saves work.
    os.environ.update(env)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")


def _worker_pool(jobs: int, env: dict):
    ctx = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(env,))


def _record(sources, scenario_modules, dtypes) -> dict:
    """In a worker: every launch the scenarios make, the cache keys, and the discovery result."""
    import torch
    import triton

    from .compile import jit_function

    torch.set_num_threads(1)  # the host code's GEMMs are tiny; threads only add barrier waits
    from .record import recording

    found = {}
    for root, package in sources:
        found.update(discovery.jit_functions(pathlib.Path(root), package))
    launches, problems = [], []
    with recording() as rec:
        for mod in scenario_modules:
            scen = importlib.import_module(mod)
            for dtype in dtypes:
                for name, fn in scen.scenarios(dtype):
                    rec.origin = name = f"{dtype} {name}"
                    try:
                        fn()
                    except Exception as e:  # a launcher that fails on the host is a finding too
                        problems.append(f"scenario {name!r} failed on the host: {type(e).__name__}: {e}")
    version = triton.__version__
    launched = {(l.module, l.kernel) for l in rec.launches.values()}
    source = source_keys(launched | {(m, n) for m, names in found.items() if m in sys.modules for n in names})
    keys = {}
    for launch in rec.launches.values():
        key = source[(launch.module, launch.kernel)]
        keys[launch.key()] = hashlib.sha256(f"{key}|{version}|{launch.key()}".encode()).hexdigest()
        launches.append(launch)
    # Kernels no launch reaches and no launched kernel calls are not covered.
    inlined = set()
    for module, name in launched:
        inlined |= discovery.called_names(jit_function(module, name).src)
    uncovered = [f"{m}.{n}" for m, names in found.items() for n in names
                 if (m, n) not in launched and n not in inlined]
    return {"launches": launches, "keys": keys, "problems": problems, "uncovered": uncovered, "triton": version}


def source_keys(functions) -> dict:
    """{(module, name): Triton's ``cache_key``} for these jit functions, each computed with the
    starting line number of every one of them set to 0 (pass the helpers they call too).

    Triton's key hashes a function's source, the keys of the jit functions it calls and the
    constexpr globals it reads, plus the line the function starts at (for its own cache: the debug
    line info is compiled in). Registers, spills and SASS counts do not depend on that line, so it
    is zeroed first: a line added or removed above a kernel (a config list grown, a comment) does
    not recompile it, while an edit to the kernel or to a helper it calls does. Only for the
    recording process, which compiles nothing afterwards."""
    from .compile import jit_function

    fns = {(m, n): jit_function(m, n) for m, n in functions}
    for fn in fns.values():
        fn.starting_line_number, fn.hash = 0, None
    return {k: fn.cache_key for k, fn in fns.items()}


def _compile(launch, cc: int) -> dict:
    from .compile import compile_launch
    from .occupancy import shared_limit

    t0 = time.perf_counter()
    try:
        row = compile_launch(launch, cc)
        if row["shared_bytes"] > shared_limit(cc):
            row["error"] = f"needs {row['shared_bytes']} B of shared memory, sm_{cc} allows {shared_limit(cc)} per block"
    except Exception as e:  # a compile error is a result of the check, not a crash of it
        lines = f"{type(e).__name__}: {e}".strip().splitlines()
        row = {"error": "\n".join(lines[:12] + (["..."] if len(lines) > 12 else []))}
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def _check_version() -> str:
    """Hash of the check's own code: a change to how results are made invalidates the cache."""
    h = hashlib.sha256()
    for name in ("compile.py", "sass.py", "occupancy.py", "record.py"):
        h.update((pathlib.Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def check_kernels(*, dtypes=("float32", "float16", "bfloat16"), archs=ARCHS, jobs: int | None = None,
                  cache_dir: str | None = "build/kernel-check", out_json: str | None = None,
                  out_summary: str | None = None, sources=DEFAULT_SOURCES, scenario_modules=DEFAULT_SCENARIOS,
                  autotune_modes=AUTOTUNE_MODES, cuda: bool = True, cuda_root: str | None = None,
                  kernels: str | None = None, echo=print) -> dict:
    """Compile every Triton kernel launch of the package (and the CUDA sources) for ``archs``.

    Returns the report (see :mod:`.report`); ``report["ok"]`` is False on any compile error,
    spill, uncovered kernel or scenario failure. ``kernels``: only kernels whose name contains
    one of these comma-separated strings (a quicker look at one kernel; coverage is then not judged).
    """
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    env = {"TRITON_INTERPRET": "0"}
    # One process per autotune mode (the mode is read when the kernels are defined), side by side.
    pools = [_worker_pool(1, {**env, "LCDD_TRITON_AUTOTUNE": mode}) for mode in autotune_modes]
    try:
        futs = [p.submit(_record, tuple(sources), tuple(scenario_modules), tuple(dtypes)) for p in pools]
        recs = [f.result() for f in futs]
    finally:
        for p in pools:
            p.shutdown()
    launches, keys = {}, {}
    for mode, rec in zip(autotune_modes, recs):
        for launch in rec["launches"]:
            if kernels and not any(part in launch.kernel for part in kernels.split(",")):
                continue
            launches.setdefault(launch.key(), launch)
            keys[launch.key()] = rec["keys"][launch.key()]
    problems = sorted({p for rec in recs for p in rec["problems"]})
    uncovered = sorted(set.intersection(*(set(rec["uncovered"]) for rec in recs))) if not kernels else []
    version = recs[0]["triton"]
    echo(f"lcdd check-kernels: triton {version}, {len(launches)} launches x {len(archs)} archs "
         f"(recorded in {time.perf_counter() - t0:.1f}s), {jobs} workers")

    cache = pathlib.Path(cache_dir) / "cache" if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    salt = _check_version()
    todo, rows = [], []
    for key, launch in launches.items():
        for cc in archs:
            ckey = hashlib.sha256(f"{keys[key]}|sm_{cc}|{salt}".encode()).hexdigest()
            path = cache / f"{ckey}.json" if cache else None
            row = json.loads(path.read_text()) if path and path.exists() else None
            if row is None:
                todo.append((launch, cc, path))
            else:
                rows.append(report.row(launch, cc, row, cached=True))
    echo(f"  {len(rows)} cached, {len(todo)} to compile")
    t1 = time.perf_counter()
    with _worker_pool(jobs, env) as pool:
        futs = {pool.submit(_compile, launch, cc): (launch, cc, path) for launch, cc, path in todo}
        for i, fut in enumerate(cf.as_completed(futs), 1):
            launch, cc, path = futs[fut]
            result = fut.result()
            if path and "error" not in result:  # errors are recompiled: they may be transient
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(result))
                tmp.replace(path)
            rows.append(report.row(launch, cc, result, cached=False))
            if i % 50 == 0 or i == len(futs):
                echo(f"  compiled {i}/{len(futs)} ({time.perf_counter() - t1:.0f}s)")
    cuda_rows = []
    if cuda:
        from . import cuda_sources

        cuda_rows = cuda_sources.check(archs, cuda_root, echo=echo)
    result = report.build(rows, cuda_rows, uncovered=uncovered, problems=problems, triton=version,
                          python=sys.version.split()[0], seconds=time.perf_counter() - t0, cache_dir=cache_dir)
    if out_json:
        report.write_json(result, out_json)
    text = report.summary(result)
    if out_summary:
        pathlib.Path(out_summary).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out_summary).write_text(text)
    echo(text)
    return result
