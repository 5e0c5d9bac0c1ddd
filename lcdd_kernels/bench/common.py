"""Plumbing shared by every ``lcdd bench`` suite: shapes, timing, peak memory, rows, ratios,
result files, tables and targets.

A suite supplies three things and :func:`run_matrix` does the rest:

* cases: JSON-able dicts, each with a ``"group"`` label (one shape of one op) plus the fields its
  setup needs (``op``, ``T``, ``N``, ``K`` ...); every field lands in the result row;
* a setup target ``"module:function"``, called as ``fn(case, provider, device, dtype, **options)``
  and returning a :class:`Prepared` (one ``setup_fn`` per op, as Liger-Kernel does). It is named by
  string so that a memory measurement can be rerun in a fresh process when needed;
* the providers, one of which is the baseline that ratios are taken against.

Memory accounting (all numbers in bytes):

* ``state_bytes``: the tensors the provider holds before the call (inputs, weights, frozen copies,
  mask logits), de-duplicated by storage;
* ``call_peak_bytes``: the high-water mark during one call minus what was allocated just before it
  (CUDA: ``max_memory_allocated``; CPU: tensor bytes, exact, from the profiler's allocation events);
* ``peak_bytes = state_bytes + call_peak_bytes``: what the provider needs in all;
* ``extra_weight_copies = (peak − baseline peak) / weight_bytes``, where ``weight_bytes`` is one copy
  of the op's trainable weights. Memory is measured in modes ``forward`` and ``full``;
  ``backward`` rows carry time only (its memory is that of ``full``);
* CPU rows also carry ``rss_call_peak_bytes`` / ``rss_peak_bytes`` / ``rss_extra_weight_copies``:
  the process's view (VmHWM, reset through /proc/self/clear_refs, or a fresh subprocess where it
  cannot be reset), which includes non-tensor memory but is only good to a few hundred KiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

MODES = ("forward", "backward", "full")
#: Modes whose peak memory is measured (``backward`` needs the forward's graph, so it equals ``full``).
MEMORY_MODES = ("forward", "full")
SCHEMA = "lcdd-bench/1"
MIB = float(1 << 20)

# ------------------------------------------------------------------------------------ model shapes

#: Decoder dimensions from the models' Hugging Face config.json (hidden_size, intermediate_size,
#: num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers). "tiny" is for smoke tests.
MODEL_DIMS: dict[str, dict[str, int]] = {
    "qwen3-0.6b": dict(d=1024, d_ff=3072, n_heads=16, n_kv=8, head_dim=128, layers=28),
    "llama-3-8b": dict(d=4096, d_ff=14336, n_heads=32, n_kv=8, head_dim=128, layers=32),
    "tiny": dict(d=64, d_ff=96, n_heads=4, n_kv=2, head_dim=16, layers=2),
}


def projection_shapes(model: str, merge: bool = True) -> list[tuple[str, int, int]]:
    """The (names, N, K) of one decoder layer's projections (N outputs, K inputs).

    With ``merge``, projections of equal shape are merged under one name (``"k_proj/v_proj"``): they
    cost the same. Without it, all seven, in order.
    """
    try:
        m = MODEL_DIMS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_DIMS)}") from None
    q, kv = m["n_heads"] * m["head_dim"], m["n_kv"] * m["head_dim"]
    projs = [("q_proj", q, m["d"]), ("k_proj", kv, m["d"]), ("v_proj", kv, m["d"]), ("o_proj", m["d"], q),
             ("gate_proj", m["d_ff"], m["d"]), ("up_proj", m["d_ff"], m["d"]), ("down_proj", m["d"], m["d_ff"])]
    if not merge:
        return projs
    merged: dict[tuple[int, int], list[str]] = {}
    for name, n, k in projs:
        merged.setdefault((n, k), []).append(name)
    return [("/".join(names), n, k) for (n, k), names in merged.items()]


# ---------------------------------------------------------------------------------- what is run


@dataclass
class Prepared:
    """One provider of one op, ready to run.

    forward: runs one training forward and returns its output tensor.
    params: leaves that receive gradients; their ``.grad`` is reset to None before every call.
    state: every tensor the provider holds (counted once each in ``state_bytes``).
    weight_bytes: one copy of the op's trainable weights, the unit of ``extra_weight_copies``.
    info: extra fields for the result row (e.g. the backend that ran).
    """

    forward: Callable[[], torch.Tensor]
    params: Sequence[torch.Tensor]
    state: Sequence[torch.Tensor]
    weight_bytes: int
    info: dict = field(default_factory=dict)

    def state_bytes(self) -> int:
        seen: dict[int, int] = {}
        for t in self.state:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())


def zero_grads(params: Iterable[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def mode_callable(prep: Prepared, mode: str) -> Callable[[], object]:
    """The call timed in ``mode``: ``forward``, ``backward`` (of one kept forward) or ``full``."""
    if mode == "forward":
        return prep.forward
    if mode == "backward":
        y = prep.forward()
        dy = torch.randn_like(y)
        return lambda: y.backward(dy, retain_graph=True)
    if mode == "full":
        dy = None

        def full():
            nonlocal dy
            y = prep.forward()
            dy = torch.randn_like(y) if dy is None else dy
            y.backward(dy)

        return full
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def resolve(target: str) -> Callable:
    """``"package.module:function"`` -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------ timing


def time_call(fn: Callable[[], object], device: torch.device | str, grad_to_none: Sequence[torch.Tensor] = (),
              budget_s: float = 1.0, min_reps: int = 3, max_reps: int = 100) -> dict:
    """Median and 20th/80th percentile of ``fn``'s wall time in milliseconds.

    CUDA: ``triton.testing.do_bench`` (quantiles 0.5, 0.2, 0.8; it clears the L2 cache between
    calls). CPU: one warm-up call, then repeats until ``budget_s`` has passed (at least
    ``min_reps``, at most ``max_reps``), timed with ``time.perf_counter``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, grad_to_none=list(grad_to_none) or None, quantiles=[0.5, 0.2, 0.8])
        return {"ms_median": med, "ms_p20": p20, "ms_p80": p80, "reps": None}
    zero_grads(grad_to_none)
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        zero_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {**quantiles_ms(times), "reps": len(times)}


def quantiles_ms(times_ms: Sequence[float]) -> dict[str, float]:
    """Median and 20/80th percentiles of per-call times (ms), as every suite reports them."""
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"ms_median": q[0].item(), "ms_p20": q[1].item(), "ms_p80": q[2].item()}


def time_interleaved(fns: dict, device: torch.device, budget_s: float, min_reps: int = 5) -> dict:
    """Per callable: wall-time median, 20/80th percentiles and minimum (ms), and on the CPU the
    process CPU time per call (median and minimum, ms). On the CPU the callables run in alternation
    so that load from other processes falls on each alike; CUDA uses do_bench per callable."""
    if device.type == "cuda":
        return {name: time_call(fn, device) for name, fn in fns.items()}
    for fn in fns.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while min(len(t) for t in wall.values()) < min_reps or time.perf_counter() - start < budget_s * len(fns):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    out = {}
    for name in fns:
        c = torch.tensor(cpu[name], dtype=torch.float64)
        out[name] = {**quantiles_ms(wall[name]), "ms_min": min(wall[name]), "cpu_ms_median": c.median().item(),
                     "cpu_ms_min": c.min().item(), "reps": len(wall[name])}
    return out


def call_ms(row: dict) -> float | None:
    """A row's time per call. On a CPU shared with other work, wall time measures the neighbours
    as much as the provider; the process's CPU time per call (minimum over the alternating
    repeats of :func:`time_interleaved`) is its own cost. Elsewhere the median."""
    return row.get("cpu_ms_min") or row.get("ms_median")


def csv_of(kind):
    """An argparse type: a comma list of ``kind`` values, as a tuple."""
    return lambda s: tuple(kind(v) for v in s.split(",") if v)


# ----------------------------------------------------------------------------------- peak memory
#
# CUDA: the caching allocator's statistics (exact). CPU: two views of one call, since neither is
# enough alone:
#  * tensor bytes, exact: the profiler's allocation events (every CPU tensor allocation and free,
#    in order) summed to their running peak. The ratios and targets use these.
#  * the resident set, VmHWM − RSS before the call (VmHWM reset through /proc/self/clear_refs):
#    it also sees what PyTorch does not allocate (BLAS packing buffers, the C heap), but the kernel
#    counts RSS in per-thread batches and can miss a short-lived peak of a few hundred KiB, so it
#    resolves MiBs, not the 1/16-weight blocks of a 1024-wide projection. A cross-check.


def _proc_status_kib(*keys: str) -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in keys}


def _reset_hwm() -> None:
    # "5" resets the peak resident set size (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _tame_malloc() -> None:
    """Make the RSS follow tensor lifetimes: large blocks come from mmap (returned on free) and
    freed heap memory is handed back, so that a call reusing memory freed by an earlier one still
    raises the high-water mark. glibc only; harmless elsewhere."""
    libc = _libc()
    if libc:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 17)
        libc.mallopt(m_trim_threshold, 1 << 17)
        libc.malloc_trim(0)


_HWM_RESET_WORKS: bool | None = None


def hwm_reset_works() -> bool:
    """Whether VmHWM can be reset here (Linux /proc, not forbidden by the container)."""
    global _HWM_RESET_WORKS
    if _HWM_RESET_WORKS is None:
        try:
            _tame_malloc()
            torch.ones(16 << 20, dtype=torch.uint8).sum()  # 16 MiB, touched, then freed
            _tame_malloc()
            _reset_hwm()
            st = _proc_status_kib("VmHWM", "VmRSS")
            _HWM_RESET_WORKS = st["VmHWM"] - st["VmRSS"] < 8 << 10
        except (OSError, AttributeError, ValueError):
            _HWM_RESET_WORKS = False
    return _HWM_RESET_WORKS


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_call_peak_bytes(fn: Callable[[], object]) -> int:
    """CPU: the exact peak of tensor bytes allocated by ``fn()`` above those alive before it."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def rss_call_peak_bytes(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
                        tries: int = 1) -> int:
    """CPU: VmHWM − RSS over one ``fn()``, the least of ``tries`` calls (the C heap wobbles by a
    few hundred KiB from call to call). Needs :func:`hwm_reset_works`."""
    if not hwm_reset_works():
        raise RuntimeError("VmHWM cannot be reset here; use peak_memory_subprocess")
    peaks = []
    for _ in range(max(1, tries)):
        zero_grads(grad_to_none)
        gc.collect()
        _tame_malloc()
        before = _proc_status_kib("VmRSS")["VmRSS"]
        _reset_hwm()
        fn()
        peaks.append(max(0, _proc_status_kib("VmHWM")["VmHWM"] - before) << 10)
    return min(peaks)


def call_peak_bytes(fn: Callable[[], object], device: torch.device | str,
                    grad_to_none: Sequence[torch.Tensor] = ()) -> int:
    """Bytes allocated at the peak of one ``fn()`` above what was allocated just before it: CUDA's
    allocator statistics, or on CPU the exact tensor bytes (:func:`tensor_call_peak_bytes`).

    One warm-up call runs first so that one-time allocations (thread pools, GEMM workspaces,
    kernel compilation) are not counted. Both counts are exact. For the resident-set view use
    :func:`rss_call_peak_bytes`.
    """
    device = torch.device(device)
    zero_grads(grad_to_none)
    fn()
    zero_grads(grad_to_none)
    gc.collect()
    if device.type != "cuda":
        return tensor_call_peak_bytes(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


_CHILD = """
import json, sys
from lcdd_kernels.bench import common
spec = json.loads(sys.argv[1])
print(json.dumps(common._child_peak(**spec)))
"""


def _child_peak(target: str, case: dict, provider: str, device: str, dtype: str, mode: str, options: dict) -> dict:
    """Runs in a fresh process: setup, a warm-up call, then one call measured by VmHWM − RSS.

    Without a resettable VmHWM the mark also covers the import and setup, so this is an upper
    bound; it is exact whenever the call's peak is the process's highest, as for any op whose
    call allocates more than its setup's temporaries."""
    _tame_malloc()
    prep = resolve(target)(case, provider, device, dtype, **options)
    fn = mode_callable(prep, mode)
    zero_grads(prep.params)
    fn()
    zero_grads(prep.params)
    gc.collect()
    _tame_malloc()
    before = _proc_status_kib("VmRSS")["VmRSS"]
    fn()
    call = max(0, _proc_status_kib("VmHWM")["VmHWM"] - before) << 10
    return {"rss_call_peak_bytes": call, "state_bytes": prep.state_bytes(), "weight_bytes": prep.weight_bytes}


def peak_memory_subprocess(target: str, case: dict, provider: str, device: str, dtype: str, mode: str,
                           options: dict | None = None, timeout_s: float = 600) -> dict:
    """The RSS view when VmHWM cannot be reset in this process: one call in a fresh Python."""
    spec = dict(target=target, case=case, provider=provider, device=device, dtype=dtype, mode=mode,
                options=options or {})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- the rows

_VERSIONS: dict | None = None


def versions() -> dict:
    """Package versions, read from metadata (importing transformers just for this is slow)."""
    global _VERSIONS
    if _VERSIONS is None:
        import lcdd_kernels

        _VERSIONS = {"python": platform.python_version(), "torch": torch.__version__,
                     "lcdd_kernels": lcdd_kernels.__version__}
        for pkg in ("triton", "transformers"):
            try:
                _VERSIONS[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                _VERSIONS[pkg] = None
    return dict(_VERSIONS)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        name = m.group(1).strip() if m else name
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def stamp(device: torch.device | str, dtype: torch.dtype) -> dict:
    """The fields every row carries: where, when and with what it was measured."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }


def make_row(suite: str, stamp_: dict, case: dict, provider: str, mode: str, **measured) -> dict:
    return {"suite": suite, **stamp_, **case, "provider": provider, "mode": mode, **measured}


GROUP_KEYS = ("suite", "group", "mode", "dtype", "device")


def add_ratios(rows: list[dict], baseline: str, keys: Sequence[str] = GROUP_KEYS) -> list[dict]:
    """Annotate each row in place with its ratio to the baseline provider's row of its group.

    ``time_vs_baseline`` = median / baseline median; ``mem_vs_baseline`` = peak / baseline peak;
    ``extra_weight_copies`` = (peak − baseline peak) / weight_bytes (and ``rss_extra_weight_copies``
    from the resident-set view where rows have it). None where either side lacks the number.
    """
    base = {tuple(r.get(k) for k in keys): r for r in rows if r["provider"] == baseline}
    for r in rows:
        b = base.get(tuple(r.get(k) for k in keys), {})
        r["baseline"] = baseline
        r["time_vs_baseline"] = _ratio(r.get("ms_median"), b.get("ms_median"))
        r["mem_vs_baseline"] = _ratio(r.get("peak_bytes"), b.get("peak_bytes"))
        for key, out in (("peak_bytes", "extra_weight_copies"), ("rss_peak_bytes", "rss_extra_weight_copies")):
            pk, bpk, wb = r.get(key), b.get(key), r.get("weight_bytes")
            if None not in (pk, bpk, wb) and wb:
                r[out] = (pk - bpk) / wb
            elif key == "peak_bytes":
                r[out] = None
    return rows


def _ratio(a, b):
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------------- result files


class ResultsFile:
    """A JSON results file: ``{"schema", "rows": [...], "targets": [...]}``.

    Refuses to replace an existing file unless ``force``; with ``append`` the rows of this run are
    added to those already there. The check happens at construction, before anything is measured;
    :meth:`write` then rewrites the file atomically (call it as rows come in, so that an
    interrupted run keeps what it measured).
    """

    def __init__(self, path: str | os.PathLike, force: bool = False, append: bool = False):
        self.path = Path(path)
        self.old_rows: list[dict] = []
        self.old_targets: list[dict] = []
        if self.path.exists():
            if append:
                data = load_results(self.path)
                self.old_rows, self.old_targets = data["rows"], data.get("targets", [])
            elif not force:
                raise FileExistsError(
                    f"{self.path} exists; pass --force to replace it or --append to add this run's rows to it")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rows: list[dict], targets: list[dict] = ()) -> None:
        data = {"schema": SCHEMA, "rows": self.old_rows + list(rows), "targets": self.old_targets + list(targets)}
        from ..atomic import write_file_atomic

        write_file_atomic(self.path, json.dumps(data, indent=1) + "\n")


def load_results(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a JSON results file ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not an lcdd bench results file (expected schema {SCHEMA!r} with 'rows')")
    return data


# ------------------------------------------------------------------------------------- the matrix


def run_matrix(suite: str, target: str, cases: Sequence[dict], providers: Sequence[str], modes: Sequence[str],
               device: str, dtype: torch.dtype, baseline: str, *, options: dict | None = None,
               budget_s: float = 1.0, min_reps: int = 3, memory: bool = True, rss_tries: int = 3,
               results: ResultsFile | None = None, progress: bool = True) -> list[dict]:
    """Every provider × mode of every case, side by side; one row each, ratios filled in.

    ``memory``: measure peak memory in the modes of MEMORY_MODES; on CPU also the resident-set
    view, the least of ``rss_tries`` calls (0: skip it).

    A provider that fails (missing backend, out of memory) gives a row with ``error`` set instead
    of stopping the run. Rows are written to ``results`` after each case.
    """
    from tqdm import tqdm

    options = options or {}
    setup = resolve(target)
    dev = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    st = stamp(dev, dtype)
    rows: list[dict] = []
    bar = tqdm(total=len(cases) * len(providers) * len(modes), desc=f"bench {suite}", unit="run",
               disable=not progress or None)
    for case in cases:
        for provider in providers:
            for mode in modes:
                bar.set_postfix_str(f"{case['group']} {provider} {mode}")
                measured: dict = {}
                try:
                    measured = _measure(setup, target, case, provider, mode, dev, dtype_name, options,
                                        budget_s, min_reps, rss_tries if memory else None)
                except Exception as e:  # one failing provider must not lose the whole run
                    measured = {"error": f"{type(e).__name__}: {e}"[:500]}
                if "error" in measured and dev.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()  # after an out-of-memory, start the next one clean
                rows.append(make_row(suite, st, case, provider, mode, **measured))
                bar.update()
        add_ratios(rows, baseline)
        if results is not None:
            results.write(rows)
    bar.close()
    return rows


def _measure(setup, target, case, provider, mode, dev, dtype_name, options, budget_s, min_reps, rss_tries) -> dict:
    prep = setup(case, provider, str(dev), dtype_name, **options)
    out = {**prep.info, "weight_bytes": prep.weight_bytes, "state_bytes": prep.state_bytes()}
    fn = mode_callable(prep, mode)
    out.update(time_call(fn, dev, prep.params, budget_s=budget_s, min_reps=min_reps))
    out.update(call_peak_bytes=None, peak_bytes=None, memory_method=None)
    if rss_tries is None or mode not in MEMORY_MODES:
        return out
    fn = mode_callable(prep, mode)  # a fresh graph for backward-holding modes
    out["call_peak_bytes"] = call_peak_bytes(fn, dev, prep.params)
    out["peak_bytes"] = out["state_bytes"] + out["call_peak_bytes"]
    out["memory_method"] = "cuda-allocator" if dev.type == "cuda" else "cpu-tensors"
    if dev.type == "cpu" and rss_tries:
        if hwm_reset_works():
            # the C heap's call-to-call wobble only matters next to small weights
            tries = rss_tries if prep.weight_bytes < 64 * MIB else 1
            out["rss_call_peak_bytes"] = rss_call_peak_bytes(fn, prep.params, tries)
        else:
            del prep, fn
            gc.collect()
            sub = peak_memory_subprocess(target, case, provider, str(dev), dtype_name, mode, options)
            out["rss_call_peak_bytes"] = sub["rss_call_peak_bytes"]
        out["rss_peak_bytes"] = out["state_bytes"] + out["rss_call_peak_bytes"]
    return out


# ----------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A performance target checked on each group of rows it applies to (never an assertion).

    applies(rows) says whether a group (rows of one case, mode, dtype and device, keyed by
    provider) is one the target is about; value(rows) computes the number compared to ``limit``.
    """

    name: str
    description: str
    applies: Callable[[dict[str, dict]], bool]
    value: Callable[[dict[str, dict]], float | None]
    limit: float
    op: str = "<="  # or ">="


def check_targets(rows: Sequence[dict], targets: Sequence[Target]) -> list[dict]:
    """One result per (target, group): status ``pass`` / ``miss`` / ``no data``; plus a
    ``not measured`` entry for a target no group applied to."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), {})[r["provider"]] = r
    results = []
    for t in targets:
        hits = [g for g in groups.values() if t.applies(g)]
        for g in hits:
            v = t.value(g)
            ok = None if v is None else (v <= t.limit if t.op == "<=" else v >= t.limit)
            first = next(iter(g.values()))
            results.append({"target": t.name, "description": t.description, "group": first["group"],
                            "mode": first["mode"], "device": first["device"], "dtype": first["dtype"],
                            "value": v, "op": t.op, "limit": t.limit,
                            "status": "no data" if ok is None else "pass" if ok else "miss"})
        if not hits:
            results.append({"target": t.name, "description": t.description, "group": None, "mode": None,
                            "value": None, "op": t.op, "limit": t.limit, "status": "not measured"})
    return results


def format_targets(results: Sequence[dict]) -> str:
    lines, last = [], None
    for r in results:
        if r["target"] != last:
            lines.append(f"target {r['target']}: {r['description']}")
            last = r["target"]
        if r["status"] == "not measured":
            lines.append("    not measured in this run")
            continue
        v = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        lines.append(f"    {r['status'].upper():5} {r['group']} [{r['mode']}]: {v} {r['op']} {r['limit']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ tables

#: (header, row -> text) for the standard table.
COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("group", lambda r: r["group"]),
    ("mode", lambda r: r["mode"]),
    ("provider", lambda r: r["provider"] + _backend_note(r)),
    ("median ms", lambda r: _f(r.get("ms_median"), "{:.3f}")),
    ("p20-p80 ms", lambda r: "" if r.get("ms_p20") is None else f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}"),
    ("x base", lambda r: _f(r.get("time_vs_baseline"), "{:.2f}")),
    ("peak MiB", lambda r: _f(None if r.get("peak_bytes") is None else r["peak_bytes"] / MIB, "{:.1f}")),
    ("+W copies", lambda r: _f(r.get("extra_weight_copies"), "{:+.2f}")),
    ("+W (RSS)", lambda r: _f(r.get("rss_extra_weight_copies"), "{:+.2f}")),
    ("error", lambda r: r.get("error", "")),
]


def _backend_note(r: dict) -> str:
    note = "/".join(str(r[k]) for k in ("backend", "design") if r.get(k))
    return f" ({note})" if note else ""


def _f(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, Callable[[dict], str]]] = COLUMNS) -> str:
    """Plain-text table; columns that are empty in every row are dropped."""
    cells = [[fn(r) for _, fn in columns] for r in rows]
    keep = [i for i in range(len(columns)) if any(c[i] not in ("", "-") for c in cells)]
    head = [columns[i][0] for i in keep]
    body = [[c[i] for i in keep] for c in cells]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cols: "  ".join(x.ljust(w) for x, w in zip(cols, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


# ---------------------------------------------------------------------------------- command line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
