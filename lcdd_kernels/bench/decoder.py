"""What the eraser and gather suites share: decoder models with prompts and a channel set per
layer, and the loop that times the providers of each group in alternation.

Models: ``tiny-32k`` (Llama layout, d 256, 4 layers, 32k vocabulary) and ``qwen3-0.6b`` (the real
dimensions, random weights; GPU only). Channels: a random quarter of d per layer, at every layer
(carriers keep about 16–27% of ``*_write`` entries), prompts of 24–64 tokens.

Timing: on the CPU the providers of a group run in alternation, and ratios (``cost_vs_baseline``)
and steps/s use the process's CPU time per call, minimum over the repeats: on a machine shared
with other work, wall time measures the neighbours as much as the provider (the wall-time median,
percentiles and minimum are in every row too). On CUDA: ``do_bench`` medians.
"""

from __future__ import annotations

import gc

import torch

from . import tables
from .memory import call_peak_bytes
from .rows import add_ratios, device_name, make_row, stamp
from .tables import _f
from .timing import call_ms, time_interleaved

#: model name -> tiny_config overrides (family first)
MODELS = {
    "tiny-32k": ("llama", dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                 head_dim=128, tie_word_embeddings=True, max_position_embeddings=4096)),
}
#: (device type, quick) -> models
PLANS = {("cpu", True): ("tiny-32k",), ("cpu", False): ("tiny-32k",),
         ("cuda", True): ("tiny-32k", "qwen3-0.6b"), ("cuda", False): ("tiny-32k", "qwen3-0.6b")}

N_PROMPTS, BATCH = 64, 16


def build_models(name: str, device: str, dtype: torch.dtype):
    """(lcdd model, base model, prompts, channels): two differently seeded models of one shape."""
    from ..models.tiny import tiny_model

    family, over = MODELS[name]
    models = [tiny_model(family, seed, dtype, device=device, **over).eval().requires_grad_(False) for seed in (1, 0)]
    config = models[0].config
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(24, 65, (N_PROMPTS,), generator=g)
    prompts = [torch.randint(3, config.vocab_size, (int(n),), generator=g) for n in lengths]
    d = config.hidden_size
    channels = {layer: torch.randperm(d, generator=g)[: d // 4].sort().values.to(device)
                for layer in range(config.num_hidden_layers)}
    return models[0], models[1], prompts, channels


def models_for(args, device: str) -> tuple[str, ...]:
    """--models, or the plan's models for the device and --quick; unknown names refused."""
    models = tuple(args.models.split(",")) if args.models else PLANS[(torch.device(device).type, bool(args.quick))]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
    if torch.device(device).type == "cpu" and "qwen3-0.6b" in models:
        print("note: qwen3-0.6b on the CPU takes many minutes per measurement")
    return models


def ratio(g, num: str, den: str):
    """call_ms(num) / call_ms(den) of a group's rows, keyed by provider; None without both."""
    a, b = call_ms(g.get(num, {})), call_ms(g.get(den, {}))
    return a / b if a and b else None


def applies(prefix, device_type, kappa=None):
    """A target's filter: groups whose name starts with ``prefix``, on ``device_type``."""
    def f(g):
        r = next(iter(g.values()))
        return (r["group"].startswith(prefix) and r["device_type"] == device_type
                and (kappa is None or r.get("kappa") == kappa))
    return f


#: The table of these suites: CPU time per call next to the wall time, steps/s for step groups.
COLUMNS = tables.COLUMNS[:5] + [
    ("min ms", lambda r: _f(r.get("ms_min"), "{:.1f}")),
    ("cpu ms (min)", lambda r: _f(r.get("cpu_ms_min"), "{:.1f}")),
    ("x base", lambda r: _f(r.get("cost_vs_baseline"), "{:.3f}")),
    ("steps/s", lambda r: _f(r.get("steps_per_s"), "{:.2f}")),
] + tables.COLUMNS[6:7] + tables.COLUMNS[-1:]


def run_groups(suite: str, todo: list[dict], prepare, device: str, dtype: torch.dtype, budget_s: float,
               memory: bool, results=None, fields: dict | None = None) -> list[dict]:
    """Every group of ``todo`` (dicts with group, model, mode, providers, baseline and the fields
    of the row), its providers timed in alternation, one row each.

    ``prepare(case, provider, models)`` returns (the callable timed, its cleanup); ``models`` is
    :func:`build_models` of the case's model, built once for consecutive cases of one model.
    ``fields`` are added to every row. Rows are written to ``results`` after each group.
    """
    from tqdm.auto import tqdm

    dev = torch.device(device)
    st = stamp(dev, dtype)
    print(f"lcdd bench {suite}: {len(todo)} groups on {device_name(device)}, {dtype}")
    rows: list[dict] = []
    bar = tqdm(total=sum(len(c["providers"]) for c in todo), desc=f"bench {suite}", unit="run")
    built = {}
    for case in todo:
        if case["model"] not in built:
            built.clear()
            gc.collect()
            built[case["model"]] = build_models(case["model"], device, dtype)
        row_fields = {k: v for k, v in case.items() if k not in ("providers", "baseline", "mode")}
        row_fields.update(fields or {})
        bar.set_postfix_str(case["group"])
        measured = {p: {} for p in case["providers"]}
        prepared, cleanups = {}, []
        try:
            for provider in case["providers"]:
                fn, cleanup = prepare(case, provider, built[case["model"]])
                prepared[provider] = fn
                cleanups.append(cleanup)
            for provider, m in time_interleaved(prepared, dev, budget_s).items():
                measured[provider].update(m)
                if case["mode"] == "step":
                    measured[provider]["steps_per_s"] = 1e3 / call_ms(m)
            if memory:
                for provider, fn in prepared.items():
                    measured[provider]["peak_bytes"] = call_peak_bytes(fn, dev)
        except Exception as e:  # one failing group must not lose the run
            for m in measured.values():
                m["error"] = f"{type(e).__name__}: {e}"[:500]
        finally:
            for cleanup in cleanups:
                cleanup()
        for provider in case["providers"]:
            rows.append(make_row(suite, st, row_fields, provider, case["mode"], **measured[provider]))
            bar.update()
        group_rows = [r for r in rows if r["group"] == case["group"]]
        add_ratios(group_rows, case["baseline"])
        base_row = next(r for r in group_rows if r["provider"] == case["baseline"])
        for r in group_rows:
            r["cost_vs_baseline"] = ratio({"a": r, "b": base_row}, "a", "b")
        if results is not None:
            results.write(rows)
    bar.close()
    return rows
