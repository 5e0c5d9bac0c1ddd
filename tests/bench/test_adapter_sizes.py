"""`lcdd bench adapter-sizes` counts what export_peft really writes: on a real (tiny) carrier its
exact-LoRA, truncated-LoRA and SHiRA byte counts equal the tensors in the exported adapters, and
its truncation errors equal the export report's."""

from __future__ import annotations

import math

import pytest
from safetensors import safe_open

import lcdd_kernels as L
from lcdd_kernels.bench import adapter_sizes
from lcdd_kernels.bench.shapes import projection_shapes
from lcdd_kernels.models.tiny import tiny_model


def _tensor_bytes(adapter_dir) -> int:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


def test_sizes_and_errors_are_those_of_the_exported_adapters(tmp_path, monkeypatch):
    handle = L.apply_lcdd(tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=0), seed=1, init_mean=0.0,
                          init_std=1.0, non_projection="base")
    carrier = L.extract_carrier(handle, include_theta=False)
    carrier.save(tmp_path / "carrier")
    monkeypatch.setattr(adapter_sizes, "RANKS", (2, 5))  # below the tiny carrier's ranks: truncation happens
    row = adapter_sizes.real(str(tmp_path / "carrier"))

    stored = sum(m.delta.nbytes + m.rows.nbytes + m.cols.nbytes for m in carrier.modules.values())
    assert row["carrier_bytes"] == stored
    exact = L.export_peft(carrier, tmp_path / "lora")
    assert row["lora_exact_bytes"] == _tensor_bytes(tmp_path / "lora")
    assert row["max_exact_rank"] == max(m.rank for m in exact.modules)
    for k in (2, 5):
        rep = L.export_peft(carrier, tmp_path / f"lora{k}", max_rank=k)
        assert rep.truncated, f"max_rank {k} should truncate some module"
        assert row[f"lora_{k}_bytes"] == _tensor_bytes(tmp_path / f"lora{k}")
        assert row[f"lora_{k}_max_module_error"] == pytest.approx(max(m.rel_error for m in rep.truncated), rel=1e-5)
        # the whole carrier's error: the modules' lost energy over the total, from the report's errors
        sq = {p: float(m.delta.double().square().sum()) for p, m in carrier.modules.items()}
        lost = sum(m.rel_error ** 2 * sq[m.path] for m in rep.modules)
        assert row[f"lora_{k}_error"] == pytest.approx(math.sqrt(lost / sum(sq.values())), rel=1e-5)
    L.export_peft(carrier, tmp_path / "shira", kind="shira")
    assert row["shira_bytes"] == _tensor_bytes(tmp_path / "shira")  # values and two int32 indices each


def test_unmerged_projection_shapes_are_the_seven_projections():
    names = [n for n, _, _ in projection_shapes("llama-3-8b", merge=False)]
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    merged = projection_shapes("llama-3-8b")
    assert sum(len(n.split("/")) for n, _, _ in merged) == 7 and len(merged) < 7
