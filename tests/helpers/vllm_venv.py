"""The module-level gate of the vLLM test modules: they run under `make test-vllm` only, and say why
when they cannot (the venv's build log's tail)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_vllm_venv() -> None:
    if not os.environ.get("LCDD_VLLM_PYTHON"):
        pytest.skip("the vLLM check runs under `make test-vllm` (vLLM has a venv of its own); not part of "
                    "`make test`", allow_module_level=True)
    stamp = os.environ.get("LCDD_VLLM_STAMP")
    if stamp and not Path(stamp).exists():
        log = Path(os.environ.get("LCDD_VLLM_LOG", ""))
        tail = log.read_text(errors="replace")[-1500:] if log.is_file() else "(no build log)"
        pytest.skip(f"the vLLM venv could not be built (no {stamp}); tail of {log}:\n{tail}",
                    allow_module_level=True)
