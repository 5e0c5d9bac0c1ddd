"""`lcdd bench serving` without vLLM: the bank's half is measured and the vLLM row says why it is
missing (the run with vLLM is `make test-vllm`'s territory: tests/serving/test_vllm_serving.py)."""

from __future__ import annotations

import json

from lcdd_kernels.cli import main


def test_serving_without_vllm_measures_the_bank_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LCDD_VLLM_PYTHON", str(tmp_path / "no-venv" / "python"))
    out = tmp_path / "serving.json"
    rc = main(["bench", "serving", "--quick", "--requests", "4", "--new-tokens", "3", "--repeats", "1",
               "--device", "cpu", "--out", str(out)])
    assert rc == 1  # a provider failed: the exit status says so
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    bank, vllm = rows["bank"], rows["vllm"]
    assert "error" not in bank and bank["tokens_per_s"] > 0 and bank["ttft_s"] > 0
    assert bank["requests"] == 4 and bank["new_tokens"] == 3
    assert "no vLLM environment" in vllm["error"] and "make test-vllm" in vllm["error"]


def test_serving_refuses_a_dtype_other_than_fp32(capsys):
    assert main(["bench", "serving", "--dtype", "bfloat16", "--device", "cpu"]) == 2
    assert "--dtype bfloat16" in capsys.readouterr().err
