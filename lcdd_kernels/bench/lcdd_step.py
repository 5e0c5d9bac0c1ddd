"""Whole LCDD training step on a Qwen3-0.6B-shaped model: plain-sft vs parametrize vs lcdd.

One step = forward, cross-entropy loss, backward, optimizer step(s), on random weights of the
Qwen3-0.6B shape (CPU: 4 decoder layers; GPU: all 28), batch 4×256 tokens by default.

* ``plain-sft``: the unpatched model; AdamW on the projection weights (embeddings, norms and
  lm_head frozen, as in LCDD) — the floor;
* ``parametrize``: the authors' approach: ``torch.nn.utils.parametrize`` on every projection with the
  masked-delta parametrization of the op-level suite (dense ``W_eff`` in fp32 on every forward),
  the L0 penalty in the loss, AdamW on W and SGD on θ;
* ``lcdd``: :func:`lcdd_kernels.apply_lcdd`; the penalty's gradient is added after backward;
* ``plain-sft-compiled``, ``lcdd-compiled``: the same steps with the model's forward (and backward)
  through ``torch.compile(fullgraph=True)`` (``--compile-backend``, default inductor); their rows
  add ``compile_s``, the first (compiling) step's time.

Every row also reports ``proj_flop_share``: the projections' share of the step's matmul FLOPs
(projections, attention scores and values, lm_head; forward and backward alike, so the share is
the forward's). With the full 151,936-token lm_head and a few layers it is small (the step is
mostly the lm_head, which every provider pays alike); ``--vocab`` (e.g. 4096) or ``--layers 28``
with a small batch give a case where the projections dominate.

All providers are built side by side and timed in interleaved rounds (one step of each per round),
so that a drifting machine load slows them alike. Reported per provider: step time
(median, p20–p80), tokens/s, peak memory (the tensors held —
weights, frozen base, masks, optimizer state — plus the step's high-water mark), and ratios to
plain-sft. Targets: step time ≤ 1.1× plain-sft; peak ≤ plain-sft + one copy of the
projection weights + 5% of plain-sft's peak.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from . import tables
from .command import add_common_arguments, open_results, report, resolve_device_dtype
from .masked_delta import MaskedDeltaParametrization
from .memory import call_peak_bytes
from .prepared import Prepared, zero_grads
from .rows import add_ratios, device_name, make_row, stamp
from .tables import _f
from .targets import Target
from .timing import quantiles_ms

SUITE = "lcdd-step"
PROVIDERS = ("plain-sft", "parametrize", "lcdd", "plain-sft-compiled", "lcdd-compiled")
DEFAULT_PROVIDERS = ("plain-sft", "parametrize", "lcdd")
BASELINE = "plain-sft"
#: Qwen3-0.6B's config.json (the fields that shape a training step).
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 max_position_embeddings=40960, rms_norm_eps=1e-6)
#: device type -> decoder layers when --layers is not given
LAYERS = {"cpu": 4, "cuda": 28}


def build_model(layers: int, device: str, dtype: torch.dtype, seed: int = 0, vocab: int | None = None):
    """The Qwen3-0.6B shape with ``layers`` decoder layers (and ``vocab`` tokens) and random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{**QWEN3_06B, "num_hidden_layers": layers, "vocab_size": vocab or QWEN3_06B["vocab_size"]})
    cfg.use_cache = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg).to(dtype)
    return model


def _base_state(model) -> dict[str, torch.Tensor]:
    """A base model's state: projection weights = the model's minus a small random delta, built one
    tensor at a time; every other tensor shared with the model (no copy)."""
    from ..models.families import module_paths

    proj = {f"{p}.weight" for _, _, p in module_paths(model)}
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(1)
    out = {}
    for name, t in model.state_dict().items():
        if name in proj:
            b = torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype).mul_(0.01 * float(t.std()))
            out[name] = b.add_(t)
        else:
            out[name] = t
    return out


class _GQAColumns(MaskedDeltaParametrization):
    """o_proj: the column logits are the v logits repeated over each kv head's query heads."""

    def __init__(self, base, row_logits, v_logits, dims):
        super().__init__(base, row_logits, v_logits)
        self.dims = dims

    def forward(self, weight):
        from ..models.families import expand_gqa

        cols = expand_gqa(self.straight_through(self.col_logits), self.dims)
        r = self.straight_through(self.row_logits)
        base = self.base.float()
        return (base + torch.outer(r, cols) * (weight.float() - base)).to(weight.dtype)


def _parametrize(model, base_state) -> list[nn.Parameter]:
    """The authors' patch: per layer one θ per mask group, a parametrization per projection.
    Returns the mask logits."""
    from ..models.families import Dims, decoder_layers, get_family

    fam, dims = get_family(model), Dims.from_config(model)
    masks = []
    for i, layer in enumerate(decoder_layers(model)):
        theta = nn.ParameterDict({g: nn.Parameter(torch.empty(n, device=model.device).normal_(1.5, 0.5))
                                  for g, n in dims.group_sizes().items()})
        layer.bench_masks = theta
        masks += list(theta.values())
        for proj in fam.projections:
            lin = layer.get_submodule(proj.path)
            b = base_state[f"{fam.layers}.{i}.{proj.path}.weight"]
            if proj.gqa_cols:
                par = _GQAColumns(b, theta[proj.rows], theta[proj.cols], dims)
            else:
                par = MaskedDeltaParametrization(b, theta[proj.rows], theta[proj.cols])
            P.register_parametrization(lin, "weight", par)
    return masks


def proj_flop_share(cfg, seq: int) -> float:
    """The projections' share of a step's matmul FLOPs (per token: 2·N·K per projection, causal
    attention 2·seq·heads·head_dim for scores and for values, half of it masked, 2·V·d lm_head)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    proj = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f) * cfg.num_hidden_layers
    attn = 2 * seq * q * cfg.num_hidden_layers  # scores + values, causal (half of 2 · 2 · seq · q)
    head = 2 * cfg.vocab_size * d
    return proj / (proj + attn + head)


def prepare(case: dict, provider: str, device: str, dtype: str, compile_backend: str = "inductor") -> Prepared:
    """Model, optimizers and one warm-up step (so optimizer state exists); ``forward`` runs one
    whole training step and returns the loss."""
    from ..dual import DualController
    from ..models.families import module_paths
    from ..models.patch import apply_lcdd

    dt = getattr(torch, dtype)
    model = build_model(case["layers"], device, dt, vocab=case.get("vocab"))
    compiled = provider.endswith("-compiled")
    provider = provider.removesuffix("-compiled")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    proj = [model.get_submodule(p).weight for _, _, p in module_paths(model)]
    weight_bytes = sum(w.numel() * w.element_size() for w in proj)
    handle, masks, ctl = None, [], DualController(warmup_steps=0, lambda_init=1e-4)
    if provider == "plain-sft":
        weights = [w.requires_grad_(True) for w in proj]
    elif provider == "parametrize":
        weights = [w.requires_grad_(True) for w in proj]
        masks = _parametrize(model, _base_state(model))
    elif provider == "lcdd":
        handle = apply_lcdd(model, _base_state(model), seed=0, non_projection="base")  # projections only, as the others
        weights, masks = handle.parameters()["weights"], handle.parameters()["masks"]
    else:
        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    opts = [torch.optim.AdamW(weights, lr=2e-5)] + ([torch.optim.SGD(masks, lr=0.1)] if masks else [])
    g = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (case["batch"], case["seq"]), generator=g, device=device)

    fwd = torch.compile(model, backend=compile_backend, fullgraph=True) if compiled else model

    def step() -> torch.Tensor:
        loss = fwd(input_ids=ids, labels=ids).loss
        ctl.observe(loss)
        if provider == "parametrize":  # the authors put the penalty into the loss
            loss = loss + ctl.lam * torch.stack([torch.sigmoid(t).sum() for t in masks]).sum()
        loss.backward()
        if handle is not None:
            handle.add_penalty_grad_(ctl.lam)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        ctl.step(1)
        return loss.detach()

    t0 = time.perf_counter()
    step()  # warm-up (compiles, for a compiled provider): allocates the optimizer state, then held state
    first_s = time.perf_counter() - t0
    state = [t for t in model.parameters()] + [t for t in model.buffers()]
    state += [v for o in opts for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    info = {"tokens": case["batch"] * case["seq"], "proj_flop_share": proj_flop_share(model.config, case["seq"]),
            "first_step_s": first_s, "compile_s": first_s if compiled else None,
            "compile_backend": compile_backend if compiled else None}
    return Prepared(forward=step, params=weights + masks, state=state, weight_bytes=weight_bytes, info=info)


def _time_interleaved(preps: dict[str, Prepared], device: str, budget_s: float, min_reps: int = 3,
                      max_reps: int = 50) -> dict[str, dict]:
    """Step times of every provider, measured in rounds (one step of each per round) so that a
    machine whose load drifts over minutes slows every provider alike. Median and p20/p80 in ms."""
    dev = torch.device(device)
    times: dict[str, list[float]] = {p: [] for p in preps}
    start = time.perf_counter()
    while len(next(iter(times.values()))) < min_reps or (
            time.perf_counter() - start < budget_s and len(next(iter(times.values()))) < max_reps):
        for name, prep in preps.items():
            zero_grads(prep.params)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            prep.forward()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        out[name] = {**quantiles_ms(ts), "reps": len(ts), "timing": "interleaved rounds"}
    return out


def measure(case: dict, providers, device: str, dtype: str, budget_s: float, memory: bool,
            compile_backend: str = "inductor") -> dict[str, dict]:
    """Every provider prepared side by side, timed in interleaved rounds, then each one's peak memory."""
    preps, out = {}, {}
    for p in providers:
        try:
            preps[p] = prepare(case, p, device, dtype, compile_backend)
        except Exception as e:  # one failing provider must not lose the others
            out[p] = {"error": f"{type(e).__name__}: {e}"[:500]}
    for p, prep in preps.items():
        out[p] = {**prep.info, "weight_bytes": prep.weight_bytes, "state_bytes": prep.state_bytes()}
    for p, t in _time_interleaved(preps, device, budget_s).items():
        out[p].update(t, tokens_per_s=out[p]["tokens"] / (t["ms_median"] / 1e3),
                      call_peak_bytes=None, peak_bytes=None, memory_method=None)
    if memory and preps:
        for p, prep in preps.items():
            out[p]["call_peak_bytes"] = call_peak_bytes(prep.forward, device, prep.params)
            out[p]["memory_method"] = "cuda-allocator" if torch.device(device).type == "cuda" else "cpu-tensors"
            out[p]["peak_bytes"] = out[p]["state_bytes"] + out[p]["call_peak_bytes"]
    return out


def _applies(g: dict) -> bool:
    return BASELINE in g and "lcdd" in g


def _mem_excess(g: dict) -> float | None:
    """(lcdd peak − plain peak − one projection-weight copy) / plain peak."""
    a, b = g["lcdd"].get("peak_bytes"), g[BASELINE].get("peak_bytes")
    if a is None or not b:
        return None
    return (a - b - g["lcdd"]["weight_bytes"]) / b


TARGETS = [
    Target("step-time", "whole LCDD step: lcdd time / plain-sft <= 1.10", _applies,
           lambda g: g["lcdd"].get("time_vs_baseline"), 1.10),
    Target("step-memory", "lcdd peak <= plain-sft + one projection-weight copy + 5% "
           "(value: excess over plain + W, as a share of plain's peak)", _applies, _mem_excess, 0.05),
]

COLUMNS = (tables.COLUMNS[:5] + [("tokens/s", lambda r: _f(r.get("tokens_per_s"), "{:.0f}")),
                                  ("proj FLOPs", lambda r: _f(r.get("proj_flop_share"), "{:.0%}")),
                                  ("compile s", lambda r: _f(r.get("compile_s"), "{:.1f}"))]
           + tables.COLUMNS[5:])


def add_arguments(p) -> None:
    add_common_arguments(p, default_budget=5.0)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on CPU, 28 on CUDA)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size (default Qwen3-0.6B's 151936; small: the projections dominate the step)")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=",".join(PROVIDERS))
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the *-compiled providers")


def run(args) -> int:
    device, dtype = resolve_device_dtype(args)
    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or BASELINE not in providers:
        raise ValueError(f"--providers: choose from {', '.join(PROVIDERS)} and include {BASELINE!r} (got {providers})")
    results = open_results(args)
    dtype_name = str(dtype).removeprefix("torch.")
    layers = args.layers or LAYERS[torch.device(device).type]
    if args.quick:
        layers = min(layers, 2)
    vocab = f", vocab {args.vocab}" if args.vocab else ""
    case = {"group": f"qwen3-0.6b-shape x{layers} layers, {args.batch}x{args.seq} tokens{vocab}", "model": "qwen3-0.6b",
            "layers": layers, "batch": args.batch, "seq": args.seq, "vocab": args.vocab}
    print(f"lcdd bench {SUITE}: {case['group']} on {device_name(device)}, {dtype_name}")
    st = stamp(device, dtype)
    measured = measure(case, providers, device, dtype_name, args.budget, not args.no_memory, args.compile_backend)
    rows = [make_row(SUITE, st, case, p, "step", **measured[p]) for p in providers]
    add_ratios(rows, BASELINE)
    return report(rows, TARGETS, results, args.plot, COLUMNS)
