"""Serving: carriers through vLLM (natively by the package's plugin, and as exact LoRA) and the package's bank.

Two groups of rows, chosen with ``--groups`` (default both):

``tiny-llama``: the tiny served Llama (``serving.vllm_env``), three carriers (about 20% of mask
entries on) exported with ``export_peft`` for vLLM, and a batch in which the requests cycle
through carrier 0, 1, 2 and none.

* ``bank``: ``apply_carrier_bank`` + ``model.generate`` (greedy, KV cache) over the whole batch,
  each sequence with its carrier, in this process;
* ``vllm``: one offline ``LLM.generate`` of the same requests in the vLLM venv (``max_loras`` =
  carriers + 1, the spare slot that keeps requests without an adapter on the base model); its
  greedy tokens are compared with the bank's.

The native path is measured in the ``qwen3`` group only: on the tiny model (hidden 128) every
provider's step is engine overhead, and two more vLLM engines would double the group's time.

``qwen3``: a Qwen3-0.6B-shaped model (:mod:`.serving_qwen3`: ``--layers`` decoder layers, the
demo's small vocabulary, random weights) and four random carriers at ``--sparsity`` per side,
all on vLLM: ``vllm-base`` (LoRA off), ``vllm-native-1`` / ``vllm-native-4`` (the plugin) and
``vllm-lora-4`` (the same four carriers as exact LoRA, requests cycling through them; where
their rank is above vLLM's 512 the row says so instead). The group's targets (:data:`TARGETS`)
are checked on it. Its three engines are started together and their timed batches alternate,
repeat after repeat (the runner's ``interleave``), so that a change in the CPU's speed during
the group falls on every provider alike.

Per provider: ``tokens_per_s`` = generated tokens / wall time of the batch, ``ttft_s`` = wall
time of the same batch with one new token (every request arrives at once, so this is what each
waits for its first token), and ``decode_tokens_per_s`` = the tokens after the first / the time
after it (wall − ttft); medians of ``--repeats`` after one warm-up. ``start_s`` is the engine's
start (vLLM: building the LLM; bank: patching the model and loading the carriers).
``resident_bytes_per_slot``: what one carrier holds in a native slot (Δ, int32 rows and columns,
the columns once per fused vLLM layer), or one vLLM LoRA slot at the ``max_lora_rank`` the
exact LoRA needs (vLLM allocates every slot at that rank); ``carrier_bytes``: the carrier as
stored; ``adapter_bytes``: the exact LoRA as ``export_peft`` writes it. Greedy tokens are
compared where two providers serve the same requests exactly (``tokens_match``). Reported as
measured, whichever wins: on a CPU, vLLM's strengths (paged attention on a GPU, continuous
batching of a stream of requests) are not what a single offline batch shows. Everything is
served in float32 (the tiny group's carriers are extracted against its fp32 weights and the
tokens are compared): ``--dtype`` other than float32 is refused.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import common

SUITE = "serving"
PROVIDERS = ("bank", "vllm", "vllm-base", "vllm-native-1", "vllm-native-4", "vllm-lora-4")
GROUPS = ("tiny-llama", "qwen3")


def add_arguments(p) -> None:
    common.add_common_arguments(p)
    p.add_argument("--groups", type=common.csv_of(str), default=GROUPS,
                   help=f"comma list from {', '.join(GROUPS)} (default: both)")
    p.add_argument("--requests", type=int, default=None, help="requests in the batch (default 16; --quick 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 64; --quick 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--layers", type=int, default=4, help="qwen3 group: decoder layers of the model (default 4)")
    p.add_argument("--sparsity", type=float, default=0.8,
                   help="qwen3 group: fraction of each mask group that is off, per side (default 0.8)")
    p.add_argument("--vllm-python", default=None,
                   help="python of the vLLM venv (default: $LCDD_VLLM_PYTHON or build/vllm-venv/bin/python)")


def _prompts(tok, n: int) -> list[list[int]]:
    from ..demo.base import render_prompt
    from ..demo.world import make_world

    world = make_world(seed=0, n_train=0, n_eraser=0, n_heldout=n)
    return [render_prompt(tok, ex.prompt) for ex in world.heldout[:n]]


def run(args) -> int:
    import os

    device, _ = common.resolve_device_dtype(args)
    # Both sides serve the fp32 model the carriers were extracted against: the bank refuses a base
    # whose weights differ from the carriers' (a bf16 cast does), and the tokens are compared.
    if args.dtype and common.DTYPES[args.dtype] != torch.float32:
        raise ValueError(f"lcdd bench serving: --dtype {args.dtype}: this suite serves fp32 models on "
                         "both sides (its carriers are extracted against fp32 weights); drop --dtype")
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown or not args.groups:
        raise ValueError(f"lcdd bench serving: --groups {','.join(args.groups)}: choose from {', '.join(GROUPS)}")
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    if new_tokens < 2:
        raise ValueError(f"lcdd bench serving: --new-tokens {new_tokens}: decode needs at least 2 (the first "
                         "token is the prefill's)")
    if "qwen3" in args.groups:
        from .serving_qwen3 import check_options

        check_options(args.layers, args.sparsity, new_tokens)
    if args.vllm_python:
        os.environ["LCDD_VLLM_PYTHON"] = args.vllm_python
    results = common.open_results(args)
    n_req = args.requests or (8 if args.quick else 16)
    stamp = common.stamp(device, torch.float32)
    rows = []
    if "tiny-llama" in args.groups:
        rows += _tiny_llama(args, device, stamp, n_req, new_tokens)
    if "qwen3" in args.groups:
        rows += _qwen3(args, stamp, n_req, new_tokens)
    add_ratios(rows)
    columns = [("group", lambda r: r["group"].removeprefix("serving/")), ("provider", lambda r: r["provider"]),
               ("requests", lambda r: str(r["requests"])), ("new tokens", lambda r: str(r["new_tokens"])),
               ("tokens/s", lambda r: common._f(r.get("tokens_per_s"), "{:.1f}")),
               ("decode tok/s", lambda r: common._f(r.get("decode_tokens_per_s"), "{:.1f}")),
               ("vs vllm-base", lambda r: common._f(r.get("decode_vs_vllm_base"), "{:.2f}x")),
               ("vs bank", lambda r: common._f(r.get("tokens_per_s_vs_bank"), "{:.2f}x")),
               ("TTFT s", lambda r: common._f(r.get("ttft_s"), "{:.3f}")),
               ("start s", lambda r: common._f(r.get("start_s"), "{:.1f}")),
               ("tokens match", lambda r: r.get("tokens_match", "-")),
               ("slot MiB", lambda r: common._f(_mib(r.get("resident_bytes_per_slot")), "{:.2f}")),
               ("carrier MiB", lambda r: common._f(_mib(r.get("carrier_bytes")), "{:.2f}")),
               ("adapter MiB", lambda r: common._f(_mib(r.get("adapter_bytes")), "{:.2f}")),
               ("error", lambda r: (r.get("error") or r.get("not_servable") or "")[:80])]
    return common.report(rows, TARGETS, results, None, columns)


def _mib(n):
    return None if n is None else n / 2**20


def add_ratios(rows: list[dict]) -> list[dict]:
    """In place: ``decode_tokens_per_s`` of every measured row, and per group each row's ratio to
    the group's ``bank`` row (``tokens_per_s_vs_bank``, ``ttft_vs_bank``) and ``vllm-base`` row
    (``tokens_per_s_vs_vllm_base``, ``decode_vs_vllm_base``) where the group has it measured."""
    for r in rows:
        if "error" not in r and "tokens_per_s" in r and r["wall_s"] > r["ttft_s"]:
            r["decode_tokens_per_s"] = r["requests"] * (r["new_tokens"] - 1) / (r["wall_s"] - r["ttft_s"])
    groups: dict[str, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], {})[r["provider"]] = r
    for g in groups.values():
        bank, base = g.get("bank", {}), g.get("vllm-base", {})
        for r in g.values():
            if "tokens_per_s" not in r:
                continue
            if bank.get("tokens_per_s"):
                r["tokens_per_s_vs_bank"] = r["tokens_per_s"] / bank["tokens_per_s"]
                r["ttft_vs_bank"] = r["ttft_s"] / bank["ttft_s"]
            if base.get("tokens_per_s"):
                r["tokens_per_s_vs_vllm_base"] = r["tokens_per_s"] / base["tokens_per_s"]
            if base.get("decode_tokens_per_s") and "decode_tokens_per_s" in r:
                r["decode_vs_vllm_base"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


# ---------------------------------------------------------------------------------- targets


def _decode(g: dict, provider: str) -> float | None:
    return g.get(provider, {}).get("decode_tokens_per_s")


def _qwen3_with(*providers, key="decode_tokens_per_s"):
    def applies(g: dict) -> bool:
        first = next(iter(g.values()))
        return first["group"].startswith("serving/qwen3") and all(g.get(p, {}).get(key) for p in providers)
    return applies


def _slot_vs_carrier(g: dict) -> float | None:
    r = g["vllm-native-4"]
    return r["resident_bytes_per_slot"] / r["carrier_bytes"]


#: The native path's targets on the Qwen3-shaped group (printed as pass / miss, never asserted):
#: 4 carriers mixed cost at most 10% of the base's decode tokens/s, never less than the exact
#: LoRA's, and a slot holds about the carrier's own bytes.
TARGETS = [
    common.Target("native-vs-base", "decode tokens/s, 4 carriers mixed natively / vLLM without adapters >= 0.90",
                  _qwen3_with("vllm-base", "vllm-native-4"),
                  lambda g: _decode(g, "vllm-native-4") / _decode(g, "vllm-base"), 0.90, ">="),
    common.Target("native-vs-lora", "decode tokens/s, 4 carriers mixed natively / as exact LoRA >= 1.0",
                  _qwen3_with("vllm-lora-4", "vllm-native-4"),
                  lambda g: _decode(g, "vllm-native-4") / _decode(g, "vllm-lora-4"), 1.0, ">="),
    common.Target("native-slot-bytes", "resident bytes per native slot / the carrier's bytes <= 1.2",
                  _qwen3_with("vllm-native-4", key="resident_bytes_per_slot"), _slot_vs_carrier, 1.2),
]


# ---------------------------------------------------------------------------------- tiny-llama


def _tiny_llama(args, device, stamp, n_req, new_tokens) -> list[dict]:
    from ..carriers.bank import apply_carrier_bank
    from ..serving import vllm_env
    from ..serving.bank_generate import bank_greedy

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
        return rows
    with tempfile.TemporaryDirectory(prefix="lcdd-serving-") as tmp:
        vllm_env.save_served_model(vllm_env.served_model(0)[0], tok, Path(tmp) / "model")
        adapters, reports = vllm_env.export_for_vllm(carriers, tmp)
        reqs = [{"prompt_token_ids": p, "adapter": None if c is None else f"c{c}"} for p, c in zip(prompts, mix)]
        job = {"model": str(Path(tmp) / "model"), "dtype": "float32",
               "max_lora_rank": max(r.vllm_max_lora_rank for r in reports), "max_model_len": 256, "adapters": adapters,
               "runs": [{"name": "serve", "max_loras": len(carriers) + 1, "batches": _batches(reqs, new_tokens, args)}]}
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
            rows[-1].update(resident_bytes_per_slot=_lora_slot_bytes(model.config, job["max_lora_rank"]),
                            carrier_bytes=max(c.nbytes()["total"] for c in carriers))
        except Exception as e:  # noqa: BLE001 - the row records what failed; the bank's row stands
            rows.append(common.make_row(SUITE, stamp, case, "vllm", "generate", error=str(e)[-2000:]))
    return rows


# ---------------------------------------------------------------------------------- qwen3


def _qwen3(args, stamp, n_req, new_tokens) -> list[dict]:
    from ..carriers.export import export_peft, vllm_max_lora_rank
    from ..serving import vllm_env
    from . import serving_qwen3 as q

    model, tok = q.served_model(args.layers)
    carriers = [q.random_carrier(model, args.sparsity, s) for s in q.CARRIER_SEEDS]
    prompts = _prompts(tok, n_req)
    rank, where = max(q.exact_rank(c) for c in carriers)
    lora_rank = vllm_max_lora_rank(rank)
    case = {"group": q.group_name(args.layers, args.sparsity), "requests": n_req, "new_tokens": new_tokens,
            "layers": args.layers, "sparsity": args.sparsity, "vocab_size": len(tok),
            "prompt_tokens": sum(map(len, prompts)), "exact_lora_rank": rank}
    sizes = {"carrier_bytes": max(c.nbytes()["total"] for c in carriers)}
    native_slot = max(_native_slot_bytes(c) for c in carriers)
    lora_sizes = dict(sizes, adapter_bytes=max(_lora_adapter_bytes(c) for c in carriers))
    if lora_rank is not None:
        lora_sizes["resident_bytes_per_slot"] = _lora_slot_bytes(model.config, lora_rank)
        lora_sizes["max_lora_rank"] = lora_rank

    def row(provider, **measured):
        _, _, n, mix = q.PROVIDERS[provider]
        return common.make_row(SUITE, stamp, dict(case, carriers=n, mix=mix), provider, "generate", **measured)

    def failed(reason):
        out = [row(p, error=reason) for p in q.PROVIDERS if p != "vllm-lora-4" or lora_rank is not None]
        return out + ([] if lora_rank is not None else [row("vllm-lora-4", **lora_sizes, not_servable=not_servable)])

    not_servable = (f"exact LoRA rank {rank} ({where}) is above vLLM's max_lora_rank {q.VLLM_MAX_LORA_RANK}: "
                    "not servable exactly")
    reason = vllm_env.available()
    if reason:
        return failed(reason)
    with tempfile.TemporaryDirectory(prefix="lcdd-serving-") as tmp:
        vllm_env.save_served_model(model, tok, Path(tmp) / "model")
        del model  # vLLM loads its own copy
        adapters = {}
        for i, c in enumerate(carriers):
            adapters[f"n{i}"] = str(c.save(Path(tmp) / f"n{i}"))
            if lora_rank is not None:
                report = export_peft(c, Path(tmp) / f"l{i}", target="vllm")
                if not report.exact:
                    raise RuntimeError(f"export_peft truncated carrier {i} although its rank {rank} fits vLLM")
                adapters[f"l{i}"] = str(Path(tmp) / f"l{i}")
        # interleaved: all engines up at once, their timed batches in turn
        job = {"model": str(Path(tmp) / "model"), "dtype": "float32", "max_model_len": 256, "adapters": adapters,
               "interleave": True, "runs": q.runs(prompts, lora_rank, new_tokens, lambda r, n, prefix="": _batches(r, n, args, prefix))}
        try:
            out = vllm_env.run_job(job, timeout=1800)
        except Exception as e:  # noqa: BLE001 - the rows record what failed
            return failed(str(e)[-2000:])
    runs = {r["name"]: r for r in out["runs"]}
    batches = {(r["name"], b["name"]): b for r in out["runs"] for b in r["batches"]}
    rows, tokens = [], {}
    for provider, (run_name, prefix, n, _) in q.PROVIDERS.items():
        if run_name not in runs:
            rows.append(row(provider, **lora_sizes, not_servable=not_servable))
            continue
        gen, first = batches[run_name, f"{prefix}generate"], batches[run_name, f"{prefix}ttft"]
        tokens[provider] = [r["token_ids"] for r in gen["requests"]]
        extra = (lora_sizes if provider == "vllm-lora-4"
                 else dict(sizes, resident_bytes_per_slot=native_slot) if n else {})
        rows.append(row(provider, start_s=runs[run_name]["start_s"], wall_s=gen["wall_s"], ttft_s=first["wall_s"],
                        walls_s=gen.get("walls_s"), ttft_walls_s=first.get("walls_s"),
                        tokens_per_s=n_req * new_tokens / gen["wall_s"], vllm_version=out["vllm_version"], **extra))
    if "vllm-lora-4" in tokens:  # both exact: the same greedy tokens, up to near-ties of a random model
        match = sum(a == b for a, b in zip(tokens["vllm-lora-4"], tokens["vllm-native-4"]))
        for r in rows:
            if r["provider"] in ("vllm-lora-4", "vllm-native-4"):
                r["tokens_match"] = f"{match}/{n_req}"
    return rows


# ---------------------------------------------------------------------------------- shared


def _batches(reqs, new_tokens, args, prefix=""):
    return [{"name": f"{prefix}generate", "max_tokens": new_tokens, "warmup": 1, "repeats": args.repeats, "requests": reqs},
            {"name": f"{prefix}ttft", "max_tokens": 1, "warmup": 1, "repeats": args.repeats, "requests": reqs}]


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


def _lora_adapter_bytes(carrier) -> int:
    """Bytes of the carrier's exact LoRA as ``export_peft`` writes it (float32 A and B of rank
    min(|rows|, |cols|) per module)."""
    from ..carriers.export import _module_shapes

    shapes = _module_shapes(carrier)
    return sum(4 * min(m.rows.numel(), m.cols.numel()) * sum(shapes[p]) for p, m in carrier.modules.items())
