"""Serving: the same prompts and carrier mix through vLLM (carriers as exact LoRA) and the package's bank.

One run, two providers, the same requests: the tiny served Llama (``serving.vllm_env``), three
carriers (about 20% of mask entries on) exported with ``export_peft`` for vLLM, and a batch in
which the requests cycle through carrier 0, 1, 2 and none.

* ``bank``: ``apply_carrier_bank`` + ``model.generate`` (greedy, KV cache) over the whole batch,
  each sequence with its carrier, in this process;
* ``vllm``: one offline ``LLM.generate`` of the same requests in the vLLM venv (``max_loras`` =
  carriers + 1, the spare slot that keeps requests without an adapter on the base model);
* ``vllm-base``: the same prompts on vLLM without LoRA; ``vllm-native-1`` / ``vllm-native-4``:
  carrier directories served natively by the package's vLLM plugin, every request on one carrier /
  requests cycling through four (``tokens_per_s_vs_vllm_base``), with the bytes a carrier holds in
  its slot (``resident_bytes_per_slot``; for ``vllm``: one LoRA slot at the exact LoRA's rank).

Per provider: ``tokens_per_s`` = generated tokens / wall time of the batch, and ``ttft_s`` = wall
time of the same batch with one new token (every request arrives at once, so this is what each
waits for its first token), medians of ``--repeats`` after one warm-up; ``start_s`` is the
engine's start (vLLM: building the LLM; bank: patching the model and loading the carriers). The
greedy tokens of the two are compared and reported (``tokens_match``). Reported as measured,
whichever wins: this is a CPU, where vLLM's strengths (paged attention on a GPU, continuous
batching of a stream of requests) are not what a single offline batch shows. Both sides serve the
model in float32 (the carriers are extracted against its fp32 weights and the tokens are compared):
``--dtype`` other than float32 is refused.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import common

SUITE = "serving"
PROVIDERS = ("bank", "vllm", "vllm-base", "vllm-native-1", "vllm-native-4")


def add_arguments(p) -> None:
    common.add_common_arguments(p)
    p.add_argument("--requests", type=int, default=None, help="requests in the batch (default 16; --quick 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 64; --quick 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--vllm-python", default=None,
                   help="python of the vLLM venv (default: $LCDD_VLLM_PYTHON or build/vllm-venv/bin/python)")


def _prompts(tok, n: int) -> list[list[int]]:
    from ..demo.base import render_prompt
    from ..demo.world import make_world

    world = make_world(seed=0, n_train=0, n_eraser=0, n_heldout=n)
    return [render_prompt(tok, ex.prompt) for ex in world.heldout[:n]]


def run(args) -> int:
    import os

    from ..carriers.bank import apply_carrier_bank
    from ..serving import vllm_env
    from ..serving.bank_generate import bank_greedy

    device, _ = common.resolve_device_dtype(args)
    # Both sides serve the fp32 model the carriers were extracted against: the bank refuses a base
    # whose weights differ from the carriers' (a bf16 cast does), and the tokens are compared.
    if args.dtype and common.DTYPES[args.dtype] != torch.float32:
        raise ValueError(f"lcdd bench serving: --dtype {args.dtype}: this suite serves the fp32 tiny model on "
                         "both sides (its carriers are extracted against fp32 weights); drop --dtype")
    dtype = torch.float32
    if args.vllm_python:
        os.environ["LCDD_VLLM_PYTHON"] = args.vllm_python
    results = common.open_results(args)
    n_req = args.requests or (8 if args.quick else 16)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    stamp = common.stamp(device, dtype)
    model, tok = vllm_env.served_model(0)
    model = model.to(device)
    carriers = [vllm_env.served_carrier(s) for s in (1, 2, 3)]
    prompts = _prompts(tok, n_req)
    mix = [[0, 1, 2, None][i % 4] for i in range(n_req)]
    case = {"group": "serving/tiny-llama", "requests": n_req, "new_tokens": new_tokens, "carriers": 3,
            "mix": "0,1,2,none cycled", "prompt_tokens": sum(map(len, prompts))}
    rows = []

    # ---- the package's bank, in this process
    t0 = time.perf_counter()
    bank = apply_carrier_bank(model, carriers)
    start = time.perf_counter() - t0

    def timed(n):
        walls = []
        bank_greedy(model, bank, prompts, mix, n, tok.pad_token_id, logprobs=False)  # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            toks, _ = bank_greedy(model, bank, prompts, mix, n, tok.pad_token_id, logprobs=False)
            walls.append(time.perf_counter() - t)
        return statistics.median(walls), toks

    wall, bank_tokens = timed(new_tokens)
    ttft, _ = timed(1)
    rows.append(common.make_row(SUITE, stamp, case, "bank", "generate", start_s=start, wall_s=wall, ttft_s=ttft,
                                tokens_per_s=n_req * new_tokens / wall, threads=torch.get_num_threads()))

    # ---- vLLM, in its venv, same prompts and mix
    reason = vllm_env.available()
    if reason:
        rows.append(common.make_row(SUITE, stamp, case, "vllm", "generate", error=reason))
    else:
        with tempfile.TemporaryDirectory(prefix="lcdd-serving-") as tmp:
            vllm_env.save_served_model(vllm_env.served_model(0)[0], tok, Path(tmp) / "model")
            adapters, reports = vllm_env.export_for_vllm(carriers, tmp)
            natives = carriers + [vllm_env.served_carrier(4)]
            for i, c in enumerate(natives):  # the same carriers as directories, for the native path
                adapters[f"n{i}"] = str(c.save(Path(tmp) / f"n{i}"))
            reqs = [{"prompt_token_ids": p, "adapter": None if c is None else f"c{c}"} for p, c in zip(prompts, mix)]
            job = {"model": str(Path(tmp) / "model"), "dtype": "float32",
                   "max_lora_rank": max(r.vllm_max_lora_rank for r in reports), "max_model_len": 256, "adapters": adapters,
                   "runs": [{"name": "serve", "max_loras": len(carriers) + 1, "batches": _batches(reqs, new_tokens, args)},
                            *_native_runs(prompts, len(natives), new_tokens, args)]}
            try:
                out = vllm_env.run_job(job, timeout=1200)
                run_ = out["runs"][0]
                gen, first = run_["batches"]
                vllm_tokens = [r["token_ids"] for r in gen["requests"]]
                match = sum(a == b for a, b in zip(vllm_tokens, bank_tokens))
                rows.append(common.make_row(SUITE, stamp, case, "vllm", "generate", start_s=run_["start_s"],
                                            wall_s=gen["wall_s"], ttft_s=first["wall_s"],
                                            tokens_per_s=n_req * new_tokens / gen["wall_s"],
                                            vllm_version=out["vllm_version"], tokens_match=f"{match}/{n_req}"))
                rows[0]["tokens_match"] = f"{match}/{n_req}"
                rows[-1]["resident_bytes_per_slot"] = _lora_slot_bytes(model.config, job["max_lora_rank"])
                rows += _native_rows(out, stamp, case, n_req, new_tokens, natives)
            except Exception as e:  # noqa: BLE001 - the row records what failed; the bank's row stands
                rows.append(common.make_row(SUITE, stamp, case, "vllm", "generate", error=str(e)[-2000:]))
    base = rows[0]
    for r in rows:
        if "error" not in r:
            r["tokens_per_s_vs_bank"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["ttft_vs_bank"] = r["ttft_s"] / base["ttft_s"]
    columns = [("provider", lambda r: r["provider"]), ("requests", lambda r: str(r["requests"])),
               ("new tokens", lambda r: str(r["new_tokens"])),
               ("tokens/s", lambda r: f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"),
               ("vs bank", lambda r: f"{r['tokens_per_s_vs_bank']:.2f}x" if "tokens_per_s_vs_bank" in r else "-"),
               ("TTFT s", lambda r: f"{r['ttft_s']:.3f}" if "ttft_s" in r else "-"),
               ("start s", lambda r: f"{r['start_s']:.1f}" if "start_s" in r else "-"),
               ("tokens match", lambda r: r.get("tokens_match", "-")),
               ("slot MiB", lambda r: f"{r['resident_bytes_per_slot'] / 2**20:.2f}" if "resident_bytes_per_slot" in r
                else "-"),
               ("error", lambda r: r.get("error", "")[:80])]
    return common.report(rows, [], results, None, columns)


def _batches(reqs, new_tokens, args, prefix=""):
    return [{"name": f"{prefix}generate", "max_tokens": new_tokens, "warmup": 1, "repeats": args.repeats, "requests": reqs},
            {"name": f"{prefix}ttft", "max_tokens": 1, "warmup": 1, "repeats": args.repeats, "requests": reqs}]


def _native_runs(prompts, n_carriers, new_tokens, args) -> list[dict]:
    """The base model without LoRA, and carriers served natively by the package's vLLM plugin
    (LoRA buffers of rank 8, which the carriers do not use): every request on carrier 0, and
    requests cycling through all carriers."""
    one = [{"prompt_token_ids": p, "adapter": "n0"} for p in prompts]
    mixed = [{"prompt_token_ids": p, "adapter": f"n{i % n_carriers}"} for i, p in enumerate(prompts)]
    base = [{"prompt_token_ids": p, "adapter": None} for p in prompts]
    return [{"name": "base", "enable_lora": False, "max_loras": 1, "batches": _batches(base, new_tokens, args)},
            {"name": "native", "max_lora_rank": 8, "max_loras": n_carriers + 1,
             "batches": _batches(one, new_tokens, args, "one-") + _batches(mixed, new_tokens, args, "mixed-")}]


def _native_rows(out, stamp, case, n_req, new_tokens, natives) -> list[dict]:
    runs = {r["name"]: r for r in out["runs"]}
    batches = {(r["name"], b["name"]): b for r in out["runs"] for b in r["batches"]}
    slot = max(_native_slot_bytes(c) for c in natives)
    rows = []
    for provider, run_name, prefix, carriers, mix in (
            ("vllm-base", "base", "", 0, "none"), ("vllm-native-1", "native", "one-", 1, "carrier 0"),
            ("vllm-native-4", "native", "mixed-", len(natives), f"0..{len(natives) - 1} cycled")):
        gen, first = batches[run_name, f"{prefix}generate"], batches[run_name, f"{prefix}ttft"]
        row = common.make_row(SUITE, stamp, dict(case, carriers=carriers, mix=mix), provider, "generate",
                              start_s=runs[run_name]["start_s"], wall_s=gen["wall_s"], ttft_s=first["wall_s"],
                              tokens_per_s=n_req * new_tokens / gen["wall_s"], vllm_version=out["vllm_version"])
        if carriers:
            row["resident_bytes_per_slot"] = slot
        rows.append(row)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["tokens_per_s_vs_vllm_base"] = r["tokens_per_s"] / base
    return rows


def _native_slot_bytes(carrier) -> int:
    """Bytes a carrier holds in a native slot (float32, as served here): every Δ and row index,
    and the columns once per vLLM layer (q/k/v share theirs in qkv_proj, gate/up in gate_up_proj)."""
    shared = ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")
    total = 0
    for path, m in carrier.modules.items():
        total += m.delta.numel() * 4 + m.rows.numel() * 4
        if not path.endswith(shared):
            total += m.cols.numel() * 4
    return total


def _lora_slot_bytes(config, rank: int) -> int:
    """Bytes of one vLLM LoRA slot (float32 A and B of ``rank`` for every projection, which vLLM
    allocates per slot whatever the adapter's own rank)."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = sum(rank * (k + n) for k, n in ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)))
    return 4 * per_layer * config.num_hidden_layers
