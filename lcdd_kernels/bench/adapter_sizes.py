"""Adapter sizes: bytes per carrier as stored vs as an exact LoRA, SHiRA and LoRA at max_rank 64/128/256 (error alongside).

Rows, one per carrier:

* ``carrier`` (``--carrier DIR``, e.g. the demo's ``demo-out/lcdd/carrier``): a real carrier, in
  its own dtype; every module's Δ decomposed (SVD) for the truncation error.
* ``synthetic/<model>/s=<sparsity>``: Qwen3-0.6B and Llama-3-8B projection shapes with the
  paper's sparsities (75–85% of mask entries off, every group alike), bf16 (2 bytes); Δ is iid
  Gaussian, so the truncation errors are a worst case (a flat spectrum), not what SFT deltas
  give. Every layer has the same shapes and distribution, so one layer's SVD gives the errors and
  the byte counts are that layer's times the layer count.

Columns: ``carrier_bytes`` (Δ plus int32 rows/cols, as stored), ``lora_exact_bytes`` (the
selection construction: rank min(|rows|, |cols|) per module), ``shira_bytes`` (PEFT SHiRA: one
r for all modules, values plus two int32 indices each), ``max_exact_rank`` (what vLLM's
``max_lora_rank`` must hold; above 512 vLLM cannot serve it exactly), and per max_rank k:
``lora_k_bytes``, ``lora_k_error`` (‖Δ − Δ_k‖_F / ‖Δ‖_F over the whole carrier) and
``lora_k_max_module_error`` (the worst module).
"""

from __future__ import annotations

import math

import torch

from .command import add_common_arguments, open_results, report
from .rows import make_row, stamp
from .shapes import MODEL_DIMS, projection_shapes
from ..carriers.export import carrier_nbytes, lora_nbytes

SUITE = "adapter-sizes"
RANKS = (64, 128, 256)
SPARSITIES = (0.75, 0.80, 0.85)
MODELS = ("qwen3-0.6b", "llama-3-8b")


def add_arguments(p) -> None:
    add_common_arguments(p)
    p.add_argument("--carrier", action="append", default=[], metavar="DIR",
                   help="also a real carrier directory (repeatable), e.g. demo-out/lcdd/carrier")
    p.add_argument("--verify", default=None, metavar="PUBLIC.pem",
                   help="refuse a --carrier that is not signed by this public key's private key (lcdd sign)")


def _row(name: str, modules: list[tuple[int, int, int, int, torch.Tensor | None]], layers: int, elem: int,
         extra: dict) -> dict:
    """modules: (N, K, |rows|, |cols|, singular values of Δ or None) of one layer (or all, layers=1)."""
    row = {"group": name, **extra, "layers": layers, "elem_bytes": elem}
    row["carrier_bytes"] = layers * sum(carrier_nbytes(r, c, elem) for n, k, r, c, _ in modules)
    row["lora_exact_bytes"] = layers * sum(lora_nbytes(n, k, max(1, min(r, c)), elem) for n, k, r, c, _ in modules)
    row["max_exact_rank"] = max(min(r, c) for n, k, r, c, _ in modules)
    shira_r = max(1, max(math.ceil(r * c / (n + k)) for n, k, r, c, _ in modules))
    row["shira_r"] = shira_r
    row["shira_bytes"] = layers * sum(shira_r * (n + k) * (elem + 8) for n, k, r, c, _ in modules)
    total = sum(float(s.square().sum()) for *_, s in modules)
    for k_ in RANKS:
        row[f"lora_{k_}_bytes"] = layers * sum(lora_nbytes(n, k, max(1, min(r, c, k_)), elem)
                                               for n, k, r, c, _ in modules)
        lost = [float(s[k_:].square().sum()) for *_, s in modules]
        per = [math.sqrt(lo / float(s.square().sum())) if float(s.square().sum()) else 0.0
               for lo, (*_, s) in zip(lost, modules)]
        row[f"lora_{k_}_error"] = math.sqrt(sum(lost) / total) if total else 0.0
        row[f"lora_{k_}_max_module_error"] = max(per)
    for key in [k for k in row if k.endswith("_bytes") and k != "carrier_bytes" and k != "elem_bytes"]:
        row[key.replace("_bytes", "_vs_carrier")] = row[key] / row["carrier_bytes"]
    return row


def synthetic(model: str, sparsity: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mods = []
    for name, n, k in projection_shapes(model, merge=False):
        r, c = round((1 - sparsity) * n), round((1 - sparsity) * k)
        delta = torch.randn(r, c, generator=g)
        mods.append((n, k, r, c, torch.linalg.svdvals(delta).double()))
    return _row(f"synthetic/{model}/s={sparsity:.2f}", mods, MODEL_DIMS[model]["layers"], 2,
                {"model": model, "sparsity": sparsity, "delta": "iid Gaussian (worst case for truncation)"})


def real(directory: str, verify: str | None = None) -> dict:
    from ..carriers.export import _module_shapes
    from ..carriers.load import load_carrier

    c = load_carrier(directory, verify=verify)
    shapes = _module_shapes(c)
    mods = []
    for path, m in c.modules.items():
        n, k = shapes[path]
        s = torch.linalg.svdvals(m.delta.double()) if m.delta.numel() else torch.zeros(0, dtype=torch.float64)
        mods.append((n, k, m.rows.numel(), m.cols.numel(), s))
    stats = c.stats()["overall"]
    return _row(f"carrier/{directory}", mods, 1, c.dtype.itemsize,
                {"model": c.family, "sparsity": stats["sparsity"], "delta": "real (trained)"})


def run(args) -> int:
    results = open_results(args)
    st = stamp("cpu", torch.float32)
    rows = []
    for d in args.carrier:
        rows.append(make_row(SUITE, st, {}, "sizes", "bytes", **real(d, getattr(args, "verify", None))))
        print(f"measured {d}", flush=True)
    for model in MODELS[:1] if args.quick else MODELS:
        for s in SPARSITIES:
            rows.append(make_row(SUITE, st, {}, "sizes", "bytes", **synthetic(model, s)))
            print(f"measured {model} at sparsity {s}", flush=True)

    def mib(key):
        return lambda r: f"{r[key] / 2**20:.1f}"

    columns = [("carrier", lambda r: r["group"].split("/", 1)[1] if r["group"].startswith("synthetic") else r["group"]),
               ("stored MiB", mib("carrier_bytes")),
               ("exact LoRA MiB", lambda r: f"{r['lora_exact_bytes'] / 2**20:.1f} ({r['lora_exact_vs_carrier']:.1f}x)"),
               ("max rank", lambda r: str(r["max_exact_rank"])),
               ("SHiRA MiB", lambda r: f"{r['shira_bytes'] / 2**20:.1f} ({r['shira_vs_carrier']:.1f}x)")]
    for k in RANKS:
        columns.append((f"r{k} MiB / err", lambda r, k=k: f"{r[f'lora_{k}_bytes'] / 2**20:.1f} / "
                                                       f"{r[f'lora_{k}_error']:.3f}"))
    return report(rows, [], results, None, columns)
