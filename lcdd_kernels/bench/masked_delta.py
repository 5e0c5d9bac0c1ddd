"""Masked-delta projection, training: dense vs parametrize vs lcdd (forward/backward/full).

Run as ``lcdd bench masked-delta`` (or by its first name, ``lcdd bench training``); its rows
carry ``"suite": "training"``.

Providers, per projection of N outputs and K inputs, on T tokens:

* ``dense``: a plain ``nn.Linear`` with a trainable weight, as in full SFT (the floor);
* ``parametrize``: the authors' approach, ``torch.nn.utils.parametrize`` on the weight with a
  parametrization that holds B and the mask logits and rebuilds ``W_eff = B + (r cᵀ) ⊙ (W − B)``
  densely in float32 on every forward (Heaviside straight-through masks);
* ``lcdd``: :func:`lcdd_kernels.masked_delta_linear` (auto backend: Triton on CUDA, torch on CPU)
  with masks from :class:`lcdd_kernels.HeavisideMask`.

The SwiGLU group compares ``silu(gate(x)) * up(x)`` built from two of each provider's projections
with the fused :func:`lcdd_kernels.masked_delta_swiglu`. ``setup_linear`` / ``setup_swiglu`` are the
one setup per op; ``benchmarks/test_bench_masked_delta.py`` reuses them.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as P

from .command import DTYPES, add_common_arguments, csv_of, open_results, report, resolve_device_dtype
from .prepared import MODES, Prepared
from .rows import device_name
from .runner import run_matrix
from .shapes import MODEL_DIMS, projection_shapes
from .targets import Target

SUITE = "training"
PROVIDERS = ("dense", "parametrize", "lcdd")
#: Opt-in (``--providers``): lcdd on the Triton backend with one design forced, to find the
#: token count where ``split`` overtakes ``fused`` (FUSED_MAX_TOKENS in ops/masked_delta_triton.py).
DESIGN_PROVIDERS = ("lcdd-fused", "lcdd-split")
BASELINE = "dense"
OPS = ("linear", "swiglu")
#: This module's setup entry point, by name (a memory measurement may rerun it in a subprocess).
PREPARE = "lcdd_kernels.bench.masked_delta:prepare"

#: (device type, quick) -> (models, token counts). GPU targets are stated at T = 8192.
PLANS = {
    ("cpu", True): (("qwen3-0.6b",), (256,)),
    ("cpu", False): (("qwen3-0.6b", "llama-3-8b"), (256,)),
    ("cuda", True): (("qwen3-0.6b", "llama-3-8b"), (8192,)),
    ("cuda", False): (("qwen3-0.6b", "llama-3-8b"), (8192, 2048)),
}


# ------------------------------------------------------------------------- the authors' approach


class MaskedDeltaParametrization(nn.Module):
    """``W ↦ B + (r cᵀ) ⊙ (W − B)`` for ``torch.nn.utils.parametrize``, as the authors train.

    Holds the frozen base weight B (N, K) as a buffer and the row/column mask logits θ_r (N,),
    θ_c (K,) (shared between projections that share a mask). The masks are the straight-through
    Heaviside ``1[θ>0] − σ(θ).detach() + σ(θ)`` of SPEC §2, and the effective weight is built
    densely in float32 on every access of ``module.weight``, then cast to the weight's dtype.
    """

    def __init__(self, base: torch.Tensor, row_logits: nn.Parameter, col_logits: nn.Parameter):
        super().__init__()
        self.register_buffer("base", base)
        self.row_logits = row_logits
        self.col_logits = col_logits

    @staticmethod
    def straight_through(theta: torch.Tensor) -> torch.Tensor:
        soft = torch.sigmoid(theta)
        return (theta > 0).float() - soft.detach() + soft

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        r, c = self.straight_through(self.row_logits), self.straight_through(self.col_logits)
        base = self.base.float()
        return (base + torch.outer(r, c) * (weight.float() - base)).to(weight.dtype)


def _linear(weight: torch.Tensor) -> nn.Linear:
    """nn.Linear(K, N, bias=False) around an existing (N, K) weight (no second allocation)."""
    n, k = weight.shape
    layer = nn.Linear(k, n, bias=False, device="meta")
    layer.weight = nn.Parameter(weight)
    return layer


def parametrized_linear(weight: torch.Tensor, base: torch.Tensor, row_logits: nn.Parameter,
                        col_logits: nn.Parameter) -> nn.Linear:
    """The ``parametrize`` provider's projection: nn.Linear whose weight is W_eff (see above)."""
    layer = _linear(weight)
    P.register_parametrization(layer, "weight", MaskedDeltaParametrization(base, row_logits, col_logits))
    return layer


# ------------------------------------------------------------------------------------ setup_fns


def _generator(device: str, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _weights(n: int, k: int, device: str, dtype: torch.dtype, g: torch.Generator, need_base: bool):
    """(SFT weight W, base B or None): B ~ N(0, 1/K), W = B + a delta a tenth of that.

    Built in place so that setup creates no weight-sized temporaries."""
    base = torch.randn(n, k, generator=g, device=device, dtype=dtype).mul_(k ** -0.5)
    weight = torch.randn(n, k, generator=g, device=device, dtype=dtype).mul_(0.1 * k ** -0.5).add_(base)
    return weight, (base if need_base else None)


def _common(case: dict, provider: str, device: str, dtype: str, seed: int, n_weights: int, mask_mean: float):
    if provider not in PROVIDERS + DESIGN_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS + DESIGN_PROVIDERS)}")
    dt = DTYPES[dtype]
    g = _generator(device, seed)
    x = torch.randn(case["T"], case["K"], generator=g, device=device, dtype=dt).requires_grad_()
    pairs = [_weights(case["N"], case["K"], device, dt, g, provider != "dense") for _ in range(n_weights)]
    masks = None
    if provider != "dense":
        from ..masks import HeavisideMask

        masks = (HeavisideMask(case["N"], init_mean=mask_mean, generator=g, device=device),
                 HeavisideMask(case["K"], init_mean=mask_mean, generator=g, device=device))
    wbytes = n_weights * case["N"] * case["K"] * x.element_size()
    return x, pairs, masks, wbytes


def _lcdd_call(provider: str, op: str, call, device: str, backend: str | None, tokens: int):
    """(forward, info) for the lcdd providers: the backend that runs and, on Triton, the design.

    ``lcdd-fused`` / ``lcdd-split`` force the Triton backend and, through LCDD_TRITON_DESIGN around
    the forward, one design for the forward. The registered op's backward chooses its design again
    when it runs, outside this context: in modes ``backward`` and ``full`` these providers time the
    forced design's forward with the automatic design's backward."""
    from ..ops import masked_delta

    design = provider.partition("-")[2] or None
    backend = "triton" if design else backend
    info = {"backend": masked_delta._pick(op, torch.device(device), backend)}
    if info["backend"] == "triton":
        from ..ops import masked_delta_triton

        info["design"] = design or masked_delta_triton.choose_design(tokens)
        info["triton_autotune"] = os.environ.get("LCDD_TRITON_AUTOTUNE", "1") != "0"
    if design is None:
        return (lambda: call(backend)), info

    def forward():
        old = os.environ.get("LCDD_TRITON_DESIGN")
        os.environ["LCDD_TRITON_DESIGN"] = design
        try:
            return call(backend)
        finally:
            if old is None:
                del os.environ["LCDD_TRITON_DESIGN"]
            else:
                os.environ["LCDD_TRITON_DESIGN"] = old

    return forward, info


def setup_linear(case: dict, provider: str, device: str, dtype: str, backend: str | None = None,
                 seed: int = 0, mask_mean: float = 1.5) -> Prepared:
    """One projection: x (T, K) → (T, N); W, B (N, K); row mask (N,), column mask (K,).

    Every provider draws the same x and W from ``seed`` (and the same B and mask logits
    θ ~ N(mask_mean, 0.5) where it has them), so their results are comparable."""
    x, [(w, b)], masks, wbytes = _common(case, provider, device, dtype, seed, 1, mask_mean)
    if provider == "dense":
        layer = _linear(w)
        return Prepared(lambda: layer(x), [x, layer.weight], [x, w], wbytes)
    rows, cols = masks
    state = [x, w, b, rows.theta, cols.theta]
    if provider == "parametrize":
        layer = parametrized_linear(w, b, rows.theta, cols.theta)
        params = [x, layer.parametrizations.weight.original, rows.theta, cols.theta]
        return Prepared(lambda: layer(x), params, state, wbytes)
    from ..ops.masked_delta import masked_delta_linear

    w = nn.Parameter(w)
    forward, info = _lcdd_call(provider, "masked_delta_linear",
                               lambda be: masked_delta_linear(x, w, b, rows(), cols(), backend=be),
                               device, backend, case["T"])
    return Prepared(forward, [x, w, rows.theta, cols.theta], state, wbytes, info)


def setup_swiglu(case: dict, provider: str, device: str, dtype: str, backend: str | None = None,
                 seed: int = 0, mask_mean: float = 1.5) -> Prepared:
    """Gate and up (N = d_ff, K = d): ``silu(x·Wgᵀ) ⊙ (x·Wuᵀ)``; masks ffn_hidden (N,), ffn_read (K,)."""
    x, [(wg, bg), (wu, bu)], masks, wbytes = _common(case, provider, device, dtype, seed, 2, mask_mean)
    if provider == "dense":
        gate, up = _linear(wg), _linear(wu)
        return Prepared(lambda: F.silu(gate(x)) * up(x), [x, gate.weight, up.weight], [x, wg, wu], wbytes)
    hidden, read = masks
    state = [x, wg, bg, wu, bu, hidden.theta, read.theta]
    if provider == "parametrize":
        gate = parametrized_linear(wg, bg, hidden.theta, read.theta)
        up = parametrized_linear(wu, bu, hidden.theta, read.theta)
        params = [x, gate.parametrizations.weight.original, up.parametrizations.weight.original,
                  hidden.theta, read.theta]
        return Prepared(lambda: F.silu(gate(x)) * up(x), params, state, wbytes)
    from ..ops.masked_delta import masked_delta_swiglu

    wg, wu = nn.Parameter(wg), nn.Parameter(wu)
    forward, info = _lcdd_call(provider, "masked_delta_swiglu",
                               lambda be: masked_delta_swiglu(x, wg, bg, wu, bu, hidden(), read(), backend=be),
                               device, backend, case["T"])
    return Prepared(forward, [x, wg, wu, hidden.theta, read.theta], state, wbytes, info)


SETUP = {"linear": setup_linear, "swiglu": setup_swiglu}


def prepare(case: dict, provider: str, device: str, dtype: str, **options) -> Prepared:
    """The suite's setup entry point (see lcdd_kernels.bench.runner.run_matrix)."""
    return SETUP[case["op"]](case, provider, device, dtype, **options)


def cases(models, tokens, ops=OPS) -> list[dict]:
    """The cases of a run: every distinct projection shape (op ``linear``) and the SwiGLU pair
    (op ``swiglu``, N = d_ff) of each model, at each token count."""
    out = []
    for t in tokens:
        for model in models:
            if "linear" in ops:
                for proj, n, k in projection_shapes(model):
                    out.append({"group": f"{model} {proj} T={t}", "op": "linear", "model": model, "proj": proj,
                                "T": t, "N": n, "K": k})
            if "swiglu" in ops:
                dims = MODEL_DIMS[model]
                out.append({"group": f"{model} swiglu T={t}", "op": "swiglu", "model": model,
                            "proj": "gate_proj+up_proj", "T": t, "N": dims["d_ff"], "K": dims["d"]})
    return out


# ------------------------------------------------------------------------------------- targets


def _group_is(device_type: str, dtype: str, tokens: int | None, providers=("dense", "lcdd")):
    def applies(g: dict) -> bool:
        r = next(iter(g.values()))
        return (r["mode"] == "full" and r["device_type"] == device_type and r["dtype"] == dtype
                and (tokens is None or r["T"] == tokens) and all(p in g for p in providers))
    return applies


def _speedup(g: dict) -> float | None:
    a, b = g["parametrize"].get("ms_median"), g["lcdd"].get("ms_median")
    return a / b if a is not None and b else None


#: The targets (GPU time and memory, CPU memory). Checked and printed, never asserted.
TARGETS = [
    Target("gpu-time", "GPU bf16 T=8192, full fwd+bwd: lcdd time / dense <= 1.10",
           _group_is("cuda", "bfloat16", 8192), lambda g: g["lcdd"].get("time_vs_baseline"), 1.10),
    Target("gpu-vs-parametrize", "GPU bf16 T=8192, full: parametrize time / lcdd time >= 1.5",
           _group_is("cuda", "bfloat16", 8192, ("lcdd", "parametrize")), _speedup, 1.5, ">="),
    Target("gpu-memory", "GPU bf16 T=8192, full: lcdd peak <= dense + one base-weight copy "
           "(extra weight copies <= 1.0)",
           _group_is("cuda", "bfloat16", 8192), lambda g: g["lcdd"].get("extra_weight_copies"), 1.0),
    Target("cpu-memory", "CPU fp32, full: lcdd extra peak memory over dense <= 1.1 weight copies "
           "(parametrize needs about five)",
           _group_is("cpu", "float32", None), lambda g: g["lcdd"].get("extra_weight_copies"), 1.1),
]


# --------------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    add_common_arguments(p)
    p.add_argument("--models", type=csv_of(str), default=None,
                   help=f"comma list from {', '.join(MODEL_DIMS)} (default: by device and --quick)")
    p.add_argument("--T", type=csv_of(int), default=None, dest="tokens", help="comma list of token counts")
    p.add_argument("--ops", type=csv_of(str), default=OPS, help="linear,swiglu")
    p.add_argument("--providers", type=csv_of(str), default=PROVIDERS,
                   help=f"from {','.join(PROVIDERS + DESIGN_PROVIDERS)} (default {','.join(PROVIDERS)})")
    p.add_argument("--modes", type=csv_of(str), default=MODES, help=",".join(MODES))
    p.add_argument("--lcdd-backend", default=None, help="force the lcdd provider's backend (default: auto)")


def run(args) -> int:
    device, dtype = resolve_device_dtype(args)
    for name, given, known in (("--providers", args.providers, PROVIDERS + DESIGN_PROVIDERS),
                               ("--modes", args.modes, MODES),
                               ("--ops", args.ops, OPS), ("--models", args.models or (), MODEL_DIMS)):
        bad = [v for v in given if v not in known]
        if bad:
            raise ValueError(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    if BASELINE not in args.providers:
        raise ValueError(f"--providers must include the baseline {BASELINE!r} (ratios are taken against it)")
    results = open_results(args)
    models, tokens = PLANS[(torch.device(device).type, bool(args.quick))]
    todo = cases(args.models or models, args.tokens or tokens, args.ops)
    print(f"lcdd bench {SUITE}: {len(todo)} shapes x {len(args.providers)} providers x {len(args.modes)} modes "
          f"on {device_name(device)}, {dtype}")
    rows = run_matrix(SUITE, PREPARE, todo, args.providers, args.modes, device, dtype, BASELINE,
                      options={"backend": args.lcdd_backend}, budget_s=args.budget,
                      memory=not args.no_memory, results=results)
    return report(rows, TARGETS, results, args.plot)
