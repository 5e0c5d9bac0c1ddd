"""Result rows: the stamp every row carries (device, dtype, date, versions) and the ratios of
each row to its group's baseline provider."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import Sequence

import torch

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
