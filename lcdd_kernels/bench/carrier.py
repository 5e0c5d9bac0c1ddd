"""Carrier inference: base vs merged vs naive vs lcdd per projection, and generate tokens/s.

Groups (mode ``forward``, no autograd), per projection shape of a model, token count T,
per-side sparsity s (delta fraction f = (1 − s)²) and carrier mix m (distinct carriers in the
batch; tokens split into m contiguous blocks, one carrier each; m = 0 is "no carrier", ids −1):

* ``base``: ``F.linear(x, B)``, no carrier (the floor, the baseline of every ratio);
* ``merged``: dense ``W_eff = B + carrier``, one copy per carrier, each block of tokens through its
  own copy (the "model per behaviour" way; for m = 1 simply the merged weight);
* ``naive``: ``F.linear(x, B)`` then ``index_select`` + ``mm`` + ``index_add_`` per carrier;
* ``checked``: the one-off functional ops with every per-call check: :func:`lcdd_kernels.carrier_linear`
  for m = 1, :func:`lcdd_kernels.bank_linear` (``check_ids=True``) otherwise;
* ``lcdd``: :func:`lcdd_kernels.bank_linear` on a :class:`~lcdd_kernels.CarrierBank` (ids checked
  once, as a served model does; auto backend: CUDA for T ≤ 16, Triton above on a GPU, C++ on CPU);
* ``plan``: the prepared path, ``bank.plan(path, shape)(x, B, None, ids)``
  (:class:`~lcdd_kernels.ops.carrier_plan.CarrierPlan`: indices checked when the carrier entered
  the bank; on the CPU one native call per projection);
* ``lcdd-compiled`` (opt-in with ``--providers``): the same call under ``torch.compile(fullgraph=True)``
  (x and the ids as graph inputs); its rows add ``compile_s``, the first call's time. Not in the
  generate group.

Every row carries ``floor_bytes`` (base weight, x, y, and each used carrier's delta and indices:
what the op must move at least), the achieved bandwidth ``gbps`` = floor_bytes / time,
``of_peak`` = gbps / the device's copy bandwidth measured at the start of the run
(:mod:`lcdd_kernels.bench.bandwidth`), ``floor_ms`` = floor_bytes at that bandwidth, and
``x_floor`` = time / floor_ms (1.0 would be the memory limit).

Group ``overhead`` (CPU): N = K = 64, T = 1, one carrier, where the arithmetic is negligible: each
provider's ``host_overhead_us`` = its CPU time per call minus ``F.linear``'s (minimum over the
alternating repeats), the per-call host cost the provider adds.

Timing: on a GPU, ``do_bench`` medians. On a CPU (often shared), after a short wall-time pass the
providers of each group run again in alternation and the process's CPU time per call (minimum
over the repeats, ``cpu_ms_min``) gives the ratios (``cost_vs_baseline``) and bandwidths.

Group ``decode-step/qwen3-0.6b-4l`` (CPU; ``--no-step`` skips it): one forward of 4 sequences x 1
token over a KV cache of 64 tokens (cropped back after each call) of a model with Qwen3-0.6B's
decoder layers (4 of them; vocabulary 4096); ``base`` plain, ``plan`` served by a bank of 4
carriers at s = 0.8, one per sequence (every projection through the prepared path).

Group ``generate/<model>`` (mode ``forward``): ``model.generate`` of 4 sequences, greedy, KV
cache; ``base`` plain model, ``merged`` one carrier merged, ``naive`` one carrier through
``apply_carrier`` (index ops), ``lcdd`` a bank of 4 carriers, one per sequence; ``tokens_per_s``.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from . import common

SUITE = "carrier"
PROVIDERS = ("base", "merged", "naive", "checked", "lcdd", "plan", "lcdd-compiled")
DEFAULT_PROVIDERS = ("base", "merged", "naive", "checked", "lcdd", "plan")
#: providers the generate group runs (``plan`` there is the bank-served model, whose projections
#: call the prepared path; ``lcdd`` is the same model)
GEN_PROVIDERS = ("base", "merged", "naive", "lcdd", "plan")
BASELINE = "base"
PREPARE = "lcdd_kernels.bench.carrier:prepare"
PREFILL_T = (512, 2048, 8192)
DECODE_T = (1, 4, 16, 64)

#: (device type, quick) -> (models, projections (None: all), token counts, sparsities, mixes,
#: generate model). The GPU quick plan is the CPU one's table (T = 1, 16, 512; no carrier, one, 4 mixed)
#: on two projections, to fit the ~45 s hook of benchmarks/gpu_check.sh.
PLANS = {
    ("cpu", True): (("qwen3-0.6b",), None, (1, 16, 512), (0.8,), (0, 1, 4), "tiny"),
    ("cpu", False): (("qwen3-0.6b",), None, DECODE_T + (512, 2048), (0.7, 0.8, 0.85), (0, 1, 4, 16), "tiny"),
    ("cuda", True): (("qwen3-0.6b",), ("o_proj", "up_proj"), (1, 16, 512), (0.8,), (0, 1, 4), "tiny"),
    ("cuda", False): (("qwen3-0.6b", "llama-3-8b"), None, DECODE_T + PREFILL_T, (0.7, 0.8, 0.85), (0, 1, 4, 16),
                      "qwen3-0.6b"),
}


# ----------------------------------------------------------------------------- one projection


def _carrier(n: int, k: int, s: float, g: torch.Generator, device, dtype):
    """Random sorted rows / cols keeping round((1 − s)·N) / round((1 − s)·K) and a delta."""
    rows = torch.randperm(n, generator=g)[: round((1 - s) * n)].sort().values.to(torch.int32)
    cols = torch.randperm(k, generator=g)[: round((1 - s) * k)].sort().values.to(torch.int32)
    delta = (torch.randn(rows.numel(), cols.numel(), generator=g) * 0.02).to(device, dtype)
    return delta, rows.to(device), cols.to(device)


def token_ids(t: int, mix: int) -> torch.Tensor:
    """m contiguous blocks of tokens, one carrier each; m = 0: every token without a carrier."""
    if mix == 0:
        return torch.full((t,), -1, dtype=torch.int32)
    return (torch.arange(t) * mix // t).to(torch.int32)


def _weight_copies(wbytes: int, weight_set_mib: float) -> int:
    """How many copies of a base weight the calls cycle through so that together they exceed
    ``weight_set_mib``: decode reads each weight once per token, from memory, not from a cache
    that a loop over one weight keeps warm. Weights under 1 MiB (the overhead group) stay one copy."""
    if weight_set_mib <= 0 or wbytes < 2 ** 20:
        return 1
    return max(1, math.ceil(weight_set_mib * 2 ** 20 / wbytes))


def setup_linear(case: dict, provider: str, device: str, dtype: str, backend: str | None = None,
                 seed: int = 0, weight_set_mib: float = 0) -> common.Prepared:
    """x (T, K), base B (N, K), max(m, 1) carriers at sparsity s, ids per token. With
    ``weight_set_mib`` each call takes the next of several copies of B (and of the merged weights),
    so that the copies together exceed that size (:func:`_weight_copies`)."""
    from ..ops.carrier import _select, bank_linear, carrier_linear

    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    dt = common.DTYPES[dtype]
    t, n, k, s, mix = case["T"], case["N"], case["K"], case["s"], case["mix"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(device, dt)
    base = (torch.randn(n, k, generator=g) * k ** -0.5).to(device, dt)
    carriers = [_carrier(n, k, s, g, device, dt) for _ in range(max(mix, 1))]
    ids = token_ids(t, mix)
    groups = [(c, torch.nonzero(ids == c).flatten().to(device)) for c in range(len(carriers))]
    groups = [(c, tok) for c, tok in groups if tok.numel()]
    es = x.element_size()
    floor = es * (n * k + t * k + t * n) + sum(
        es * carriers[c][0].numel() + 4 * (carriers[c][1].numel() + carriers[c][2].numel()) for c, _ in groups)
    wbytes = n * k * es
    copies = 1 if provider == "lcdd-compiled" else _weight_copies(wbytes, weight_set_mib)  # compiled: B is a guard
    info = {"floor_bytes": floor, "carriers_used": len(groups), "weight_copies": copies}
    bases = [base] + [base.clone() for _ in range(copies - 1)]
    turn = itertools.cycle(range(copies)).__next__
    if provider == "base":
        return common.Prepared(lambda: F.linear(x, bases[turn()]), [], [x, *bases], wbytes, info)
    if provider == "merged":
        merged = []  # merged[copy][carrier]
        for b in bases:
            merged.append([])
            for delta, rows, cols in carriers:
                w = b.clone()
                w[rows.long()[:, None], cols.long()[None, :]] += delta
                merged[-1].append(w)
        held = [x, *bases, *[w for m in merged for w in m]]
        if len(groups) <= 1:
            ws = [m[groups[0][0]] for m in merged] if groups else bases
            return common.Prepared(lambda: F.linear(x, ws[turn()]), [], held, wbytes, info)

        def per_copy():
            y = x.new_empty(t, n)
            ws = merged[turn()]
            for c, tok in groups:
                y.index_copy_(0, tok, F.linear(x.index_select(0, tok), ws[c]))
            return y

        return common.Prepared(per_copy, [], held, wbytes, info)
    if provider == "naive":
        def naive():
            y = F.linear(x, bases[turn()])
            for c, tok in groups:
                delta, rows, cols = carriers[c]
                if tok.numel() == t:
                    y.index_add_(1, rows, x.index_select(1, cols) @ delta.t())
                else:
                    part = x.index_select(0, tok).index_select(1, cols) @ delta.t()
                    y.index_put_((tok[:, None], rows.long()[None, :]), part, accumulate=True)
            return y

        return common.Prepared(naive, [], [x, *bases, *[a for c in carriers for a in c]], wbytes, info)
    from ..carriers.bank import CarrierBank

    bank = CarrierBank(device, dt)
    for c in carriers:
        bank.add({"proj": c})
    dev_ids = ids.to(device)
    info["backend"] = _select("bank_linear", x, t, backend)
    state = [x, *bases, dev_ids, *[a for c in carriers for a in c]]
    if provider == "checked":
        if mix == 1:
            delta, rows, cols = carriers[0]
            return common.Prepared(lambda: carrier_linear(x, bases[turn()], delta, rows, cols, backend=backend), [],
                                   state, wbytes, info)
        return common.Prepared(lambda: bank_linear(x, bases[turn()], bank, "proj", dev_ids, backend=backend), [],
                               state, wbytes, info)
    if provider == "plan":
        plan = bank.plan("proj", (n, k))
        info["backend"] = "prepared"
        return common.Prepared(lambda: plan(x, bases[turn()], None, dev_ids), [], state, wbytes, info)
    if provider == "lcdd-compiled":
        import time

        def call(xx, ii):
            return bank_linear(xx, base, bank, "proj", ii, check_ids=False, backend=backend)

        # Dynamo caches per code object: cleared per case, or the cases together would hit its
        # recompile limit and fall back to eager. Compiled and timed in the same grad mode.
        torch._dynamo.reset()
        fn = torch.compile(call, fullgraph=True, dynamic=False)
        bank_linear(x, base, bank, "proj", dev_ids, check_ids=False, backend=backend)  # builds the table
        t0 = time.perf_counter()
        fn(x, dev_ids)
        info["compile_s"] = time.perf_counter() - t0
        return common.Prepared(lambda: fn(x, dev_ids), [], state, wbytes, info)
    return common.Prepared(lambda: bank_linear(x, bases[turn()], bank, "proj", dev_ids, check_ids=False,
                                               backend=backend), [], state, wbytes, info)


# --------------------------------------------------------------------------------- generate

GEN_BATCH, GEN_PROMPT, GEN_NEW = 4, 16, 32
_GEN_CACHE: dict = {}


def _gen_world(model_name: str, device: str, dtype: torch.dtype, s: float):
    """(base model factory, 4 carriers): carriers made by apply_lcdd + extract_carrier from
    differently seeded models, with θ drawn so that a fraction 1 − s of each mask is on."""
    key = (model_name, device, dtype, s)
    if key not in _GEN_CACHE:
        from statistics import NormalDist

        from ..carriers.extract import extract_carrier
        from ..models.patch import apply_lcdd

        mean = NormalDist().inv_cdf(1 - s)  # P(θ > 0) = 1 − s for θ ~ N(mean, 1)
        carriers = []
        for seed in (1, 2, 3, 4):
            handle = apply_lcdd(_gen_model(model_name, seed, device, dtype), _gen_model(model_name, 0, device, dtype),
                                seed=seed, init_mean=mean, init_std=1.0, non_projection="base")
            carriers.append(extract_carrier(handle, include_theta=False))
            del handle
        for other in [k for k in _GEN_CACHE if k[2] != dtype]:  # one dtype's worlds at a time
            del _GEN_CACHE[other]
        _GEN_CACHE[key] = carriers
    return _GEN_CACHE[key]


def _gen_model(name: str, seed: int, device: str, dtype: torch.dtype):
    from ..models.tiny import tiny_model
    from .decoder import MODELS

    family, over = ("qwen3", {}) if name == "tiny" else STEP_MODELS[name] if name in STEP_MODELS else MODELS[name]
    return tiny_model(family, seed, dtype, **over).to(device).eval()


def setup_generate(case: dict, provider: str, device: str, dtype: str, backend: str | None = None,
                   seed: int = 0) -> common.Prepared:
    from .. import _backend
    from ..carriers.apply import apply_carrier
    from ..carriers.bank import apply_carrier_bank
    from ..carriers.merge import merge_carrier_

    dt = common.DTYPES[dtype]
    carriers = _gen_world(case["model"], device, dt, case["s"])
    model = _gen_model(case["model"], 0, device, dt)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, min(model.config.vocab_size, 90), (GEN_BATCH, GEN_PROMPT), generator=g).to(device)

    def gen(**kw):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_NEW,
                              min_new_tokens=GEN_NEW, do_sample=False, pad_token_id=0, use_cache=True, **kw)

    run = gen  # one carrier merged or applied: plain generation
    info = {"new_tokens": GEN_BATCH * GEN_NEW}
    if provider == "merged":
        merge_carrier_(model, carriers[0])
    elif provider == "naive":
        apply_carrier(model, carriers[0])
    elif provider in ("lcdd", "plan"):
        bank = apply_carrier_bank(model, carriers)
        info["bank_mib"] = bank.nbytes() / common.MIB

        def run_bank():
            with bank.carriers([0, 1, 2, 3]), (_backend.use_backend(backend) if backend else nullcontext()):
                return gen()

        run = run_bank
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return common.Prepared(run, [], list(model.parameters()), wbytes, info)


# ------------------------------------------------------------------------------ decode step

#: Qwen3-0.6B's decoder layers (hidden 1024, 16 q / 8 kv heads of 128, intermediate 3072), 4 of them.
#: The vocabulary is cut to 4096: carriers act on the layers' projections, and Qwen3-0.6B's
#: 151936-word tied head (155 M weights against the 4 layers' 61 M) would dilute every ratio.
STEP_MODELS = {"qwen3-0.6b-4l": ("qwen3", dict(vocab_size=4096, hidden_size=1024, intermediate_size=3072,
                                               num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
                                               head_dim=128, tie_word_embeddings=True,
                                               max_position_embeddings=4096))}
STEP_MODEL, STEP_BATCH, STEP_CONTEXT = "qwen3-0.6b-4l", 4, 64
#: providers of the decode-step group
STEP_PROVIDERS = ("base", "plan")


def setup_decode_step(case: dict, provider: str, device: str, dtype: str, backend: str | None = None,
                      seed: int = 0) -> common.Prepared:
    """One decode step of STEP_BATCH sequences x 1 token over a KV cache of STEP_CONTEXT tokens
    (cropped back after every call, so every repeat sees the same context): ``base`` the plain
    model, ``plan`` the model served by a bank of 4 carriers, one per sequence."""
    import inspect

    from transformers import DynamicCache

    from .. import _backend
    from ..carriers.bank import apply_carrier_bank

    if provider not in STEP_PROVIDERS:
        raise ValueError(f"the decode-step group runs {STEP_PROVIDERS}, not {provider!r}")
    dt = common.DTYPES[dtype]
    carriers = _gen_world(case["model"], device, dt, case["s"])
    model = _gen_model(case["model"], 0, device, dt)
    model.config.use_cache = True
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(4, vocab, (STEP_BATCH, STEP_CONTEXT), generator=g).to(device)
    step = torch.randint(4, vocab, (STEP_BATCH, 1), generator=g).to(device)
    bank = apply_carrier_bank(model, carriers) if provider == "plan" else None
    cache = DynamicCache()
    # transformers >= 5.2x names the argument `cache` (past_key_values warns), 4.5x past_key_values
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{kv: cache})  # the context, built once (base weights)
    position = torch.full((STEP_BATCH, 1), STEP_CONTEXT, device=device)
    info = {"context": STEP_CONTEXT}

    def decode():
        with torch.no_grad():
            y = model(input_ids=step, position_ids=position, use_cache=True, **{kv: cache}).logits
        cache.crop(-1)  # the step's token out again
        return y

    run = decode
    if bank is not None:
        info["bank_mib"] = bank.nbytes() / common.MIB

        def run():
            with bank.carriers([0, 1, 2, 3]), (_backend.use_backend(backend) if backend else nullcontext()):
                return decode()

    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return common.Prepared(run, [], list(model.parameters()), wbytes, info)


def prepare(case: dict, provider: str, device: str, dtype: str, **options) -> common.Prepared:
    """The suite's setup entry point (see lcdd_kernels.bench.common.run_matrix)."""
    setup = {"generate": setup_generate, "decode-step": setup_decode_step}.get(case["op"])
    if setup is None:
        return setup_linear(case, provider, device, dtype, **options)
    options = {k: v for k, v in options.items() if k != "weight_set_mib"}  # whole models: their own weights
    return setup(case, provider, device, dtype, **options)


def cases(models, tokens, sparsities, mixes, projs=None) -> list[dict]:
    """Every distinct projection shape of each model (or those named in ``projs``) x T x s x mix
    (mixes larger than T, and the no-carrier mix at prefill sizes, are skipped)."""
    out = []
    for model in models:
        for proj, n, k in common.projection_shapes(model):
            if projs is not None and not set(proj.split("/")) & set(projs):
                continue
            for t in tokens:
                for s in sparsities:
                    for mix in mixes:
                        if mix > t or (mix == 0 and t > max(DECODE_T)):
                            continue
                        out.append({"group": f"{model} {proj} T={t} s={s} mix={mix}", "op": "linear", "model": model,
                                    "proj": proj, "T": t, "N": n, "K": k, "s": s, "f": (1 - s) ** 2, "mix": mix,
                                    "phase": "decode" if t <= max(DECODE_T) else "prefill"})
    return out


# ------------------------------------------------------------------------------ bandwidth, rows


def copy_bandwidth(device: str, budget_s: float) -> float:
    """GB/s of a large same-device copy (read + write): :func:`lcdd_kernels.bench.bandwidth.copy_bandwidth`."""
    from .bandwidth import copy_bandwidth as measure

    return measure(device, budget_s)


#: Rounds of the alternating CPU-time pass at least, per case. A prefill call takes 30-500 ms, so
#: the time budget alone gives it 3-5 rounds, and the minimum of so few moved the prefill ratios by
#: up to +-0.05 between runs; decode calls get hundreds of rounds from the budget.
MIN_ROUNDS = {"decode": 5, "prefill": 11}


def retime_cpu(rows: list[dict], todo: list[dict], providers, device: str, dtype: torch.dtype, options: dict,
               budget_s: float) -> None:
    """CPU: time each case's providers again, in alternation, by the process's CPU time per call
    (``cpu_ms_min``), so that load from other processes falls on every provider alike; sets
    ``cost_vs_baseline`` from it. (On a GPU the do_bench medians stand.)"""
    from tqdm import tqdm

    dtype_name = str(dtype).removeprefix("torch.")
    by_key = {(r["group"], r["provider"]): r for r in rows}
    for case in tqdm(todo, desc="CPU time, providers in alternation", unit="case"):
        fns = {}
        for p in providers:
            if "error" not in by_key.get((case["group"], p), {"error": 1}):
                fns[p] = prepare(case, p, device, dtype_name, **options).forward
        rounds = MIN_ROUNDS.get(case.get("phase"), MIN_ROUNDS["decode"])
        for p, t in common.time_interleaved(fns, torch.device(device), budget_s, min_reps=rounds).items():
            by_key[(case["group"], p)].update(cpu_ms_min=t["cpu_ms_min"], cpu_ms_median=t["cpu_ms_median"],
                                             cpu_rounds=t["reps"])
        base = by_key.get((case["group"], BASELINE), {}).get("cpu_ms_min")
        for p in fns:
            r = by_key[(case["group"], p)]
            r["cost_vs_baseline"] = r["cpu_ms_min"] / base if base else None


def add_bandwidth(rows: list[dict], peak_gbps: float) -> None:
    from .bandwidth import floor_ms

    for r in rows:
        r["peak_copy_gbps"] = peak_gbps
        ms = common.call_ms(r)
        if r.get("floor_bytes") and ms:
            r["gbps"] = r["floor_bytes"] / (ms * 1e-3) / 1e9
            r["of_peak"] = r["gbps"] / peak_gbps
            r["floor_ms"] = floor_ms(r["floor_bytes"], peak_gbps)
            r["x_floor"] = ms / r["floor_ms"]
        if r.get("new_tokens") and ms:
            r["tokens_per_s"] = r["new_tokens"] / (ms * 1e-3)


COLUMNS = [
    ("group", lambda r: r["group"]),
    ("provider", lambda r: r["provider"] + (f" ({r['backend']})" if r.get("backend") else "")),
    ("median ms", lambda r: common._f(r.get("ms_median"), "{:.4f}")),
    ("cpu ms", lambda r: common._f(r.get("cpu_ms_min"), "{:.4f}")),
    ("x base", lambda r: common._f(_ratio_row(r), "{:.3f}")),
    ("x floor", lambda r: common._f(r.get("x_floor"), "{:.2f}")),
    ("GB/s", lambda r: common._f(r.get("gbps"), "{:.1f}")),
    ("host us", lambda r: common._f(r.get("host_overhead_us"), "{:+.1f}")),
    ("of peak", lambda r: common._f(r.get("of_peak"), "{:.0%}")),
    ("tokens/s", lambda r: common._f(r.get("tokens_per_s"), "{:.0f}")),
    ("+W copies", lambda r: common._f(r.get("extra_weight_copies"), "{:+.2f}")),
    ("error", lambda r: r.get("error", "")),
]


# ---------------------------------------------------------------------------------- targets


def _is(phase, mixes, providers=("base", "plan")):
    def applies(g: dict) -> bool:
        r = next(iter(g.values()))
        return r.get("op") == "linear" and r["phase"] == phase and r["mix"] in mixes and all(
            p in g and common.call_ms(g[p]) for p in providers)
    return applies


def _ratio_row(r: dict) -> float | None:
    return r.get("cost_vs_baseline") or r.get("time_vs_baseline")


def _ratio(g, provider="plan"):
    return _ratio_row(g[provider])


def _gen(g: dict, op: str = "generate") -> bool:
    r = next(iter(g.values()))
    return r.get("op") == op and all(p in g and common.call_ms(g[p]) for p in ("base", "plan"))


#: The prepared path's targets: a carrier costs its own bytes over the base and nothing more
#: (f = (1 − s)² of the weight per carrier), checked on whatever ran and printed as pass / miss,
#: never asserted.
TARGETS = [
    common.Target("decode-none", "decode, no carrier used (ids all −1): plan/base <= 1.02",
                  _is("decode", (0,)), _ratio, 1.02),
    common.Target("decode-one", "decode, one carrier: plan/base − f <= 1.03 (plan <= (1 + f + 0.03)·base)",
                  _is("decode", (1,)), lambda g: _ratio(g) - g["plan"]["f"], 1.03),
    common.Target("decode-mixed", "decode, 4 carriers mixed: plan/base − 4f <= 1.05 (plan <= (1 + 4f + 0.05)·base)",
                  _is("decode", (4,)), lambda g: _ratio(g) - 4 * g["plan"]["f"], 1.05),
    common.Target("prefill", "prefill: plan/base <= 1.10", _is("prefill", (1, 4, 16)), _ratio, 1.10),
    common.Target("vs-naive", "never slower than the naive provider: plan time / naive time <= 1",
                  _is("decode", (1, 4, 16), ("naive", "plan")),
                  lambda g: common.call_ms(g["plan"]) / common.call_ms(g["naive"]), 1.0),
    common.Target("decode-step", "generate with a bank of 4 carriers, one per sequence: plan/base <= 1.10",
                  _gen, _ratio, 1.10),
    common.Target("decode-step-model", "decode step of a Qwen3-0.6B-shaped model (4 layers, 4 sequences x 1 "
                  "token, KV cache) with a bank of 4 carriers, one per sequence: plan/base <= 1.10",
                  lambda g: _gen(g, "decode-step"), _ratio, 1.10),
]


# ------------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    common.add_common_arguments(p, default_budget=0.3)
    p.add_argument("--models", type=common.csv_of(str), default=None,
                   help=f"comma list from {', '.join(common.MODEL_DIMS)} (default: by device and --quick)")
    p.add_argument("--T", type=common.csv_of(int), default=None, dest="tokens", help="comma list of token counts")
    p.add_argument("--sparsity", type=common.csv_of(float), default=None, help="per-side sparsities, e.g. 0.7,0.8,0.85")
    p.add_argument("--mixes", type=common.csv_of(int), default=None, help="distinct carriers per batch (0 = none)")
    p.add_argument("--providers", type=common.csv_of(str), default=DEFAULT_PROVIDERS, help=",".join(PROVIDERS))
    p.add_argument("--lcdd-backend", default=None, help="force the lcdd provider's backend (default: auto)")
    p.add_argument("--no-generate", action="store_true", help="skip the generate tokens/s group")
    p.add_argument("--dtypes", type=common.csv_of(str), default=None,
                   help="comma list of dtypes run one after the other into one table (overrides --dtype), "
                        "e.g. float32,bfloat16")
    p.add_argument("--no-overhead", action="store_true", help="skip the per-call host overhead group (CPU)")
    p.add_argument("--weight-set", type=float, default=None, metavar="MIB",
                   help="per-projection rows cycle through copies of the weight that together exceed MIB, so "
                        "each call reads it from memory as a decode step does (default: 64 on a CPU, 8x its "
                        "last-level cache here; 0 on a GPU; 0: one weight, kept warm in the cache by the loop)")
    p.add_argument("--no-step", action="store_true",
                   help="skip the decode-step group (CPU): a Qwen3-0.6B-shaped 4-layer model, 4 sequences x 1 token")


#: the host-overhead group: a projection so small that the arithmetic is negligible
OVERHEAD_CASE = {"group": "overhead N=K=64 T=1 mix=1", "op": "linear", "model": "-", "proj": "-", "T": 1, "N": 64,
                 "K": 64, "s": 0.8, "f": 0.04, "mix": 1, "phase": "overhead"}


def _host_overhead(rows: list[dict]) -> None:
    """``host_overhead_us`` of each overhead row: its CPU time per call minus the base's."""
    group = [r for r in rows if r.get("phase") == "overhead" and r.get("cpu_ms_min") is not None]
    for r in group:
        base = next((b for b in group if b["provider"] == BASELINE and b["dtype"] == r["dtype"]), None)
        if base is not None:
            r["host_overhead_us"] = (r["cpu_ms_min"] - base["cpu_ms_min"]) * 1e3


def run(args) -> int:
    device, dtype = common.resolve_device_dtype(args)
    dtypes = [common.DTYPES[d] for d in args.dtypes] if args.dtypes else [dtype]
    bad = [v for v in args.providers if v not in PROVIDERS] + [m for m in args.models or () if m not in common.MODEL_DIMS]
    bad += [d for d in args.dtypes or () if d not in common.DTYPES]
    if bad:
        raise ValueError(f"unknown provider, model or dtype {', '.join(bad)}; providers {PROVIDERS}, models "
                         f"{tuple(common.MODEL_DIMS)}, dtypes {tuple(common.DTYPES)}")
    if BASELINE not in args.providers:
        raise ValueError(f"--providers must include the baseline {BASELINE!r} (ratios are taken against it)")
    results = common.open_results(args)
    models, projs, tokens, sparsities, mixes, gen_model = PLANS[(torch.device(device).type, bool(args.quick))]
    todo = cases(args.models or models, args.tokens or tokens, args.sparsity or sparsities, args.mixes or mixes,
                 None if args.models else projs)
    cpu = torch.device(device).type == "cpu"
    if cpu and not args.no_overhead:
        todo = [dict(OVERHEAD_CASE)] + todo
    peak = copy_bandwidth(device, args.budget)
    print(f"lcdd bench {SUITE}: {len(todo)} shapes x {len(args.providers)} providers x {len(dtypes)} dtypes on "
          f"{common.device_name(device)}; copy bandwidth {peak:.1f} GB/s (the floor of every row)")
    options = {"backend": args.lcdd_backend}
    weight_set = args.weight_set if args.weight_set is not None else (64.0 if cpu else 0.0)
    linear_options = {**options, "weight_set_mib": weight_set}
    # on a CPU the wall-time pass is short: the alternating CPU-time pass below gives the ratios
    wall_budget = min(args.budget, 0.05) if cpu else args.budget
    gen_providers = [p for p in args.providers if p in GEN_PROVIDERS and p != "lcdd"]
    if "lcdd" in args.providers and "plan" not in args.providers:
        gen_providers.append("lcdd")  # the same bank-served model
    gen = [{"group": f"generate/{gen_model} B={GEN_BATCH} new={GEN_NEW}", "op": "generate", "model": gen_model,
            "s": 0.8}]
    step = [{"group": f"decode-step/{STEP_MODEL} B={STEP_BATCH} context={STEP_CONTEXT}", "op": "decode-step",
             "model": STEP_MODEL, "s": 0.8}]
    rows: list[dict] = []
    for dt in dtypes:
        part = common.run_matrix(SUITE, PREPARE, todo, args.providers, ("forward",), device, dt, BASELINE,
                                 options=linear_options, budget_s=wall_budget, memory=not args.no_memory,
                                 results=results)
        timed = todo
        if not args.no_generate:
            part += common.add_ratios(common.run_matrix(SUITE, PREPARE, gen, gen_providers, ("forward",), device, dt,
                                                        BASELINE, options=options, budget_s=wall_budget,
                                                        memory=False), BASELINE)
            timed = todo + gen
        if cpu and not args.no_step:
            step_providers = [p for p in args.providers if p in STEP_PROVIDERS]
            part += common.add_ratios(common.run_matrix(SUITE, PREPARE, step, step_providers, ("forward",), device,
                                                        dt, BASELINE, options=options, budget_s=wall_budget,
                                                        memory=False), BASELINE)
            timed = timed + step
        if cpu:
            retime_cpu(part, timed, args.providers, device, dt, linear_options, args.budget)
        rows += part
    _host_overhead(rows)
    add_bandwidth(rows, peak)
    return common.report(rows, TARGETS, results, args.plot, COLUMNS)
