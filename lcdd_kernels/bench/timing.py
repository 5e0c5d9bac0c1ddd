"""Wall and CPU time per call: ``do_bench`` on CUDA, repeats within a time budget on the CPU."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .prepared import zero_grads


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
