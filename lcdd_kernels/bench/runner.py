"""The matrix runner of the ``lcdd bench`` suites: every provider x mode of every case, side by
side, one row each with its ratios.

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

import gc
from typing import Sequence

import torch

from .memory import MIB, call_peak_bytes, hwm_reset_works, peak_memory_subprocess, rss_call_peak_bytes
from .prepared import MEMORY_MODES, mode_callable, resolve
from .results import ResultsFile
from .rows import add_ratios, make_row, stamp
from .timing import time_call


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
