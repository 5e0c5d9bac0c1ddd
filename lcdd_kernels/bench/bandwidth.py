"""The memory-bandwidth floor of the machine a benchmark runs on, measured in the same run.

A decode-sized projection reads every weight byte once; nothing can run faster than the machine
copies memory. :func:`copy_bandwidth` measures that: a buffer far larger than the last-level
cache copied into another (read + write bytes over time), the best of several repeats (the
least disturbed by other work on a shared machine). :func:`floor_ms` turns a row's byte count
into the time that bandwidth allows.
"""

from __future__ import annotations

import time

import torch

#: bytes per buffer: 256 MiB on a CPU (well past any L3), 1 GiB on a GPU
CPU_BYTES, GPU_BYTES = 1 << 28, 1 << 30


def copy_bandwidth(device: str | torch.device, budget_s: float = 0.5, min_reps: int = 5) -> float:
    """GB/s of a large same-device copy, counting the bytes read and written (2 × size), the
    best of the repeats that fit ``budget_s`` (at least ``min_reps``). GPU: ``do_bench``'s median."""
    device = torch.device(device)
    n = GPU_BYTES if device.type == "cuda" else CPU_BYTES
    a = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: b.copy_(a))
    else:
        b.copy_(a)  # first touch: page faults are not bandwidth
        times, start = [], time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < budget_s:
            t0 = time.perf_counter()
            b.copy_(a)
            times.append((time.perf_counter() - t0) * 1e3)
        ms = min(times)
    return 2 * n / (ms * 1e-3) / 1e9


def floor_ms(nbytes: int, gbps: float) -> float:
    """The least time, in ms, to move ``nbytes`` at ``gbps``."""
    return nbytes / (gbps * 1e9) * 1e3
