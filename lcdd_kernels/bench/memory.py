"""Peak memory of one call: CUDA's allocator statistics, on the CPU the exact tensor bytes from
the profiler and the resident set (VmHWM, with glibc's malloc tuned through ctypes so that the
RSS follows tensor lifetimes), in this process or a fresh one."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .prepared import mode_callable, resolve, zero_grads

MIB = float(1 << 20)

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
from lcdd_kernels.bench import memory
spec = json.loads(sys.argv[1])
print(json.dumps(memory._child_peak(**spec)))
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
