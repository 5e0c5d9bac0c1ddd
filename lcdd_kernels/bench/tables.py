"""The plain-text table a suite prints: standard columns, empty ones dropped."""

from __future__ import annotations

from typing import Callable, Sequence

from .memory import MIB

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
