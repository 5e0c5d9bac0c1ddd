"""Every ```python block in README.md and docs/**/*.md runs as written on a CPU (snippets that need
local checkpoints, a GPU or another program are ```py, ```bash or ```text instead), so the
documentation's examples cannot rot. Each block runs once, in a fresh directory."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
BLOCKS = [(page.relative_to(ROOT).as_posix(), i, code)
          for page in PAGES
          for i, code in enumerate(FENCE.findall(page.read_text(encoding="utf-8")))]
# A path outside the repository (a clone has none): the spec is docs/spec.md.
OUTSIDE = re.compile(r"\.\./shared|shared/(?:SPEC|ARCHITECTURE|STYLE)\.md")
SOURCES = [ROOT / name for name in ("README.md", "Makefile", "setup.py", "pyproject.toml", "mkdocs.yml",
                                    "CMakeLists.txt")] + [
    path for top in ("lcdd_kernels", "tests", "benchmarks", "csrc", "python", "docs", ".ci")
    for path in sorted((ROOT / top).rglob("*"))
    if path.is_file() and (path.suffix in {".py", ".md", ".sh", ".cpp", ".cu", ".h", ".txt"} or top == ".ci")]


def test_docs_have_runnable_examples():
    assert BLOCKS, "no ```python example in README.md or docs/"


def test_nothing_points_outside_the_repository():
    found = {path.relative_to(ROOT).as_posix(): hits for path in SOURCES
             if (hits := OUTSIDE.findall(path.read_text(encoding="utf-8", errors="replace")))}
    assert not found, f"paths outside the repository: {found}"


@pytest.mark.parametrize("page, index, code", BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS])
def test_docs_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page}[python block {index}]", "exec"), {"__name__": "__docs__"})


def test_readme_links_resolve():
    """README.md is not part of the mkdocs build, so its relative links are checked here."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert targets and not missing, f"README.md links to missing files: {missing}"


def test_cli_page_is_what_the_parser_prints():
    from tests.helpers.cli_page import PAGE, RENDERED_WITH, render

    if sys.version_info[:2] != RENDERED_WITH:
        pytest.skip(f"the page is rendered with Python {RENDERED_WITH[0]}.{RENDERED_WITH[1]}'s argparse")
    assert PAGE.read_text(encoding="utf-8") == render(), (
        f"{PAGE.relative_to(ROOT)} differs from the lcdd parser's --help: run python -m tests.helpers.cli_page")
