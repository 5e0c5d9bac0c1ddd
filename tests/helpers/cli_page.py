"""docs/reference/cli.md, rendered from the ``lcdd`` parser itself: every command's ``--help``.

``python -m tests.helpers.cli_page`` rewrites the page; ``tests/test_docs.py`` fails while the page
differs from what the parser prints, so a new option cannot go undocumented.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "cli.md"
WIDTH = "100"  # argparse wraps at the terminal's width: fixed, so the page is the same everywhere
RENDERED_WITH = (3, 11)  # argparse's layout changes between Python versions (3.13 folds metavars)

INTRO = """# Command line

`lcdd` is installed with the package (`lcdd = lcdd_kernels.cli:main`; `python -m lcdd_kernels.cli`
is the same). Each subcommand is one module of `lcdd_kernels/cli/`. Every command that reads a
model also takes `--tiny llama|mistral|qwen2|qwen3`, a tiny model built in code, in place of a
checkpoint directory. The `--help` of each command follows, as printed by `lcdd COMMAND --help`
(this page is generated from the parser: `python -m tests.helpers.cli_page`).
"""


def _help(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def render() -> str:
    from lcdd_kernels.cli import build_parser

    parser = build_parser()
    parts = [INTRO, f"```text\n{_help(parser)}\n```\n"]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    seen: set[int] = set()
    for name, sub in commands.choices.items():
        if id(sub) not in seen:  # an alias shares its command's parser
            seen.add(id(sub))
            parts.append(f"## lcdd {name}\n\n```text\n{_help(sub)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE}", file=sys.stderr)
