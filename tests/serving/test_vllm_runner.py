"""The vLLM runner's job checks that run before vLLM is imported (the runs themselves are tested
with vLLM in ``make test-vllm``)."""

from __future__ import annotations

import sys

import pytest

from lcdd_kernels.serving import vllm_runner


def test_interleaved_job_refuses_expected_errors_before_starting_an_engine(monkeypatch):
    # an import of vllm would fail here: the refusal must come first
    monkeypatch.setitem(sys.modules, "vllm", None)
    batch = {"name": "refused", "max_tokens": 1, "requests": [], "expect_error": True}
    job = {"model": "unused", "interleave": True,
           "runs": [{"name": "ok", "batches": [dict(batch, expect_error=False)]},
                    {"name": "bad", "batches": [batch]}]}
    with pytest.raises(ValueError, match="run 'bad': batches with expect_error cannot be interleaved"):
        vllm_runner.run(job)
