"""`lcdd bench serving` without vLLM: the bank's half is measured and the vLLM rows say why they are
missing; the Qwen3-shaped group's carriers, byte counts and targets against hand-computed numbers
(the runs with vLLM are `make test-vllm`'s territory: tests/serving/test_vllm_serving.py and
tests/serving/test_vllm_bench_serving.py)."""

from __future__ import annotations

import json

import pytest
import torch

from lcdd_kernels.bench import serving, serving_qwen3
from lcdd_kernels.bench.targets import check_targets
from lcdd_kernels.cli import main


def test_serving_without_vllm_measures_the_bank_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LCDD_VLLM_PYTHON", str(tmp_path / "no-venv" / "python"))
    out = tmp_path / "serving.json"
    rc = main(["bench", "serving", "--quick", "--groups", "tiny-llama", "--requests", "4", "--new-tokens", "3",
               "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 1  # a provider failed: the exit status says so
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    bank, vllm = rows["bank"], rows["vllm"]
    assert "error" not in bank and bank["tokens_per_s"] > 0 and bank["ttft_s"] > 0
    assert bank["decode_tokens_per_s"] > 0
    assert bank["requests"] == 4 and bank["new_tokens"] == 3
    assert "no vLLM environment" in vllm["error"] and "make test-vllm" in vllm["error"]


def test_qwen3_group_without_vllm_says_why_and_which_lora_is_not_servable(tmp_path, monkeypatch):
    """At 40% of each mask off, q_proj keeps 1229 rows and 614 columns: its exact LoRA needs rank
    614, above vLLM's 512, and the LoRA row says so instead of a measurement."""
    monkeypatch.setenv("LCDD_VLLM_PYTHON", str(tmp_path / "no-venv" / "python"))
    out = tmp_path / "serving.json"
    rc = main(["bench", "serving", "--groups", "qwen3", "--layers", "1", "--sparsity", "0.4", "--requests", "2",
               "--new-tokens", "3", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 1
    data = json.loads(out.read_text())
    rows = {r["provider"]: r for r in data["rows"]}
    assert set(rows) == {"vllm-base", "vllm-native-1", "vllm-native-4", "vllm-lora-4"}
    for p in ("vllm-base", "vllm-native-1", "vllm-native-4"):
        assert "no vLLM environment" in rows[p]["error"]
    lora = rows["vllm-lora-4"]
    assert "error" not in lora and "tokens_per_s" not in lora
    assert lora["exact_lora_rank"] == 614 and "rank 614" in lora["not_servable"] and "512" in lora["not_servable"]
    assert lora["group"] == "serving/qwen3-0.6b-shape/1-layers/s=0.4" and lora["layers"] == 1
    assert {t["status"] for t in data["targets"]} == {"not measured"}


@pytest.mark.parametrize("argv, message", [(["--dtype", "bfloat16"], "--dtype bfloat16"),
                                           (["--groups", "qwen3,nope"], "--groups qwen3,nope"),
                                           (["--groups", "qwen3", "--layers", "0"], "--layers 0"),
                                           (["--groups", "qwen3", "--sparsity", "1.0"], "--sparsity 1.0"),
                                           (["--new-tokens", "1"], "--new-tokens 1"),
                                           (["--groups", "qwen3", "--new-tokens", "300"], "at most 224")])
def test_serving_refuses_bad_options_before_building_anything(capsys, argv, message):
    assert main(["bench", "serving", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


# ----- the Qwen3-shaped group's carriers and bytes, by hand ------------------------------------


@pytest.fixture(scope="module")
def one_layer():
    model, _ = serving_qwen3.served_model(1)
    return model, serving_qwen3.random_carrier(model, 0.8, seed=1)


def test_random_carrier_keeps_a_fifth_of_every_mask_and_fits_the_model(one_layer):
    import lcdd_kernels as L

    model, c = one_layer
    # per side, round(0.2 n): hidden 1024 -> 205, q 2048 -> 410, kv 1024 -> 205, intermediate 3072 -> 614
    shapes = {p.rsplit(".", 1)[-1]: (m.rows.numel(), m.cols.numel()) for p, m in c.modules.items()}
    assert shapes == {"q_proj": (410, 205), "k_proj": (205, 205), "v_proj": (205, 205), "o_proj": (205, 410),
                      "gate_proj": (614, 205), "up_proj": (614, 205), "down_proj": (205, 614)}
    v, o = c.modules["model.layers.0.self_attn.v_proj"], c.modules["model.layers.0.self_attn.o_proj"]
    want = torch.cat([(v.rows[v.rows // 128 == h] % 128) + 128 * q for h in range(8) for q in (2 * h, 2 * h + 1)])
    assert torch.equal(o.cols.long(), want.long()), "o_proj's columns are not the v mask over the query heads"
    assert serving_qwen3.exact_rank(c)[0] == 205
    assert abs(float(torch.cat([m.delta.flatten() for m in c.modules.values()]).std()) - 0.02) < 1e-3
    L.apply_carrier_bank(model, [c]).restore()  # same base fingerprint, shapes the model's


def test_slot_and_carrier_bytes_by_hand(one_layer):
    model, c = one_layer
    # Δ: 410·205 (q) + 2·205·205 (k, v) + 205·410 (o) + 3·614·205 (gate, up, down) = 629,760
    # rows: 410 + 205 + 205 + 205 + 614 + 614 + 205 = 2,458; cols: 205·3 + 410 + 205·2 + 614 = 2,049
    assert c.nbytes()["total"] == 4 * (629_760 + 2_458 + 2_049)
    # a native slot stores the columns once per fused vLLM layer: qkv 205, o 410, gate_up 205, down 614
    assert serving._native_slot_bytes(c) == 4 * (629_760 + 2_458 + 1_434)
    # one LoRA slot at max_lora_rank 256: 256·Σ(N + K) = 256·(3,072 + 2·2,048 + 3,072 + 3·4,096)
    assert serving._lora_slot_bytes(model.config, 256) == 4 * 256 * 22_528
    assert serving._lora_adapter_bytes(c) == 4 * 205 * 22_528  # the exact LoRA, rank 205 everywhere


# ----- targets, by hand ----------------------------------------------------------------------------


def _row(group, provider, wall, ttft, **extra):
    return {"suite": "serving", "group": group, "mode": "generate", "dtype": "float32", "device": "cpu",
            "provider": provider, "requests": 4, "new_tokens": 11, "wall_s": wall, "ttft_s": ttft,
            "tokens_per_s": 44 / wall, **extra}


def test_targets_by_hand():
    g = "serving/qwen3-0.6b-shape/4-layers/s=0.8"
    rows = [
        # decode tokens: 4 requests × 10 tokens after the first = 40
        _row(g, "vllm-base", 3.0, 1.0),  # 40 / 2.0 = 20 tok/s
        _row(g, "vllm-native-4", 3.5, 1.0, resident_bytes_per_slot=110, carrier_bytes=100),  # 40 / 2.5 = 16
        _row(g, "vllm-lora-4", 4.5, 1.5, resident_bytes_per_slot=900, carrier_bytes=100),  # 40 / 3.0 = 13.3
        # the tiny group is no target's business
        _row("serving/tiny-llama", "vllm-base", 1.0, 0.5), _row("serving/tiny-llama", "vllm-native-4", 9.0, 0.5),
    ]
    serving.add_ratios(rows)
    assert rows[0]["decode_tokens_per_s"] == pytest.approx(20.0)
    assert rows[1]["decode_vs_vllm_base"] == pytest.approx(0.8)
    got = {t["target"]: t for t in check_targets(rows, serving.TARGETS)}
    assert set(got) == {"native-vs-base", "native-vs-lora", "native-slot-bytes"}
    assert all(t["group"] == g for t in got.values())
    assert got["native-vs-base"]["value"] == pytest.approx(0.8) and got["native-vs-base"]["status"] == "miss"
    assert got["native-vs-lora"]["value"] == pytest.approx(1.2) and got["native-vs-lora"]["status"] == "pass"
    assert got["native-slot-bytes"]["value"] == pytest.approx(1.1) and got["native-slot-bytes"]["status"] == "pass"


def test_native_vs_lora_is_not_measured_where_the_lora_is_not_servable():
    g = "serving/qwen3-0.6b-shape/1-layers/s=0.4"
    lora = {k: v for k, v in _row(g, "vllm-lora-4", 1.0, 0.5).items() if k not in ("wall_s", "ttft_s", "tokens_per_s")}
    rows = [_row(g, "vllm-base", 3.0, 1.0), _row(g, "vllm-native-4", 3.0, 1.0), {**lora, "not_servable": "rank 614"}]
    serving.add_ratios(rows)
    rows[1].update(resident_bytes_per_slot=150, carrier_bytes=100)
    got = {t["target"]: (t["status"], t["value"]) for t in check_targets(rows, serving.TARGETS)}
    assert got == {"native-vs-base": ("pass", 1.0), "native-vs-lora": ("not measured", None),
                   "native-slot-bytes": ("miss", 1.5)}
