"""Counts of the cases the fuzz suites ran, printed at the end of the pytest run
(tests/conftest.py's terminal summary). A suite calls ``record("op/backend/dtype")`` once per
case it checked completely; `make fuzz` reports these counts."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter = Counter()


def record(key: str) -> None:
    COUNTS[key] += 1


def summary() -> list[str]:
    """One line per key, then totals per top-level group (the part before the first '/')."""
    if not COUNTS:
        return []
    lines = [f"{key:<48} {n:>7}" for key, n in sorted(COUNTS.items())]
    groups: Counter = Counter()
    for key, n in COUNTS.items():
        groups[key.split("/")[0]] += n
    lines += [f"{'total ' + g:<48} {n:>7}" for g, n in sorted(groups.items())]
    lines.append(f"{'total':<48} {sum(COUNTS.values()):>7}")
    return lines
