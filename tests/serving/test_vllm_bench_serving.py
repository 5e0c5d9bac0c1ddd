"""`lcdd bench serving`'s Qwen3-shaped group with vLLM (``make test-vllm``), at one decoder layer and
a few tokens: every provider measured (vLLM without adapters, four random carriers natively
through the package's plugin, the same four as exact LoRA), the two exact paths agreeing token for
token, the byte columns filled and every target computed. No timing is asserted.

vLLM lives in a venv of its own (benchmarks/build_vllm_venv.sh, which also installs this package
there); this module runs only when ``make test-vllm`` points LCDD_VLLM_PYTHON at it.
"""

from __future__ import annotations

import json

from lcdd_kernels.cli import main

from tests.helpers.vllm_venv import require_vllm_venv

require_vllm_venv()


def test_qwen3_group_measures_every_provider_and_checks_the_targets(tmp_path):
    out = tmp_path / "serving.json"
    rc = main(["bench", "serving", "--groups", "qwen3", "--layers", "1", "--requests", "4", "--new-tokens", "8",
               "--repeats", "1", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = {r["provider"]: r for r in data["rows"]}
    assert rc == 0, [r.get("error") for r in data["rows"]]
    assert set(rows) == {"vllm-base", "vllm-native-1", "vllm-native-4", "vllm-lora-4"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["start_s"] > 0, r["provider"]
        # every repeat's wall time kept, the row's the median of them
        assert len(r["walls_s"]) == len(r["ttft_walls_s"]) == 1 and r["wall_s"] == r["walls_s"][0], r["provider"]
        assert r["vllm_version"].startswith("0.32.0")
    lora, native = rows["vllm-lora-4"], rows["vllm-native-4"]
    # both exact, fp32: the same greedy tokens for every request
    assert lora["tokens_match"] == native["tokens_match"] == "4/4"
    assert lora["exact_lora_rank"] == 205 and lora["max_lora_rank"] == 256
    assert lora["resident_bytes_per_slot"] == 4 * 256 * 22_528  # one LoRA slot at rank 256, one layer
    assert native["resident_bytes_per_slot"] <= native["carrier_bytes"]  # fused layers keep shared columns once
    assert lora["resident_bytes_per_slot"] > 5 * native["resident_bytes_per_slot"]
    targets = {t["target"]: t for t in data["targets"]}
    assert set(targets) == {"native-vs-base", "native-vs-lora", "native-slot-bytes"}
    slot = targets["native-slot-bytes"]
    assert slot["status"] == "pass" and slot["value"] == native["resident_bytes_per_slot"] / native["carrier_bytes"]
    # the speed targets are computed wherever decode was timed (a few tokens on a busy machine can
    # leave the batch's wall time at or below its time to first token: then there is no decode rate)
    for name, providers in (("native-vs-base", ("vllm-base",)), ("native-vs-lora", ("vllm-lora-4",))):
        timed = all("decode_tokens_per_s" in rows[p] for p in (*providers, "vllm-native-4"))
        assert targets[name]["status"] in (("pass", "miss") if timed else ("not measured",)), targets[name]
