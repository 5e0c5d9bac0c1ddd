"""Performance targets: checked on each group of rows they apply to, printed as pass / miss (never asserted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .rows import GROUP_KEYS


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
