"""JSON results files (``{"schema", "rows", "targets"}``): written as rows come in, read by plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import write_file_atomic

SCHEMA = "lcdd-bench/1"


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
