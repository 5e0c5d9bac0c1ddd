"""The CPU carrier add (``CarrierPlan.add_``, what the vLLM plugin calls after vLLM's GEMM) at the
projection shapes vLLM serves Qwen3-0.6B with (fused qkv and gate_up: (4096, 1024), (1024, 2048),
(6144, 1024), (1024, 3072)), four random carriers per projection at s = 0.8 (a fifth of the rows
and columns).

    python benchmarks/carrier_add_shapes.py [--threads 2] [--layers 4] [--repeats 15]

Per case (T tokens, the slot ids cycling over c carriers): the minimum over ``--repeats`` of one
pass over ``--layers`` layers' four projections, per layer, and the deltas' bytes read per second.
With the default four layers the deltas (about 40 MB) exceed a CPU's L3 of up to 32 MiB, so
each call reads its deltas from memory, as it does between vLLM's GEMMs in a decode step; with
``--layers 1`` (10 MB) they stay in a larger cache. Compare kernel changes by running the old and
the new build alternately: the minimum of each then sees the same load from other processes.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
SPARSITY = 0.8
CASES = ((1, 1), (4, 4), (4, 1), (16, 1), (16, 4), (64, 4))


def main() -> None:
    from lcdd_kernels.bench.carrier import _carrier
    from lcdd_kernels.ops.carrier_plan import CarrierPlan

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    # the carrier benchmark's random carrier: a fifth of the rows and columns at s = 0.8
    f32 = torch.float32
    plans = [(CarrierPlan((n, k), [_carrier(n, k, SPARSITY, g, "cpu", f32) for _ in range(4)], device="cpu",
                          dtype=f32), n, k) for _ in range(args.layers) for n, k in SHAPES.values()]
    # the deltas are alike in size per slot: one carrier's bytes over all layers
    per_carrier = sum(plan.table.entries[0].delta.numel() * 4 for plan, _, _ in plans)
    print(f"{args.layers} layers, {args.threads} threads, {per_carrier * 4 / 1e6:.0f} MB of deltas in all")
    for t, c in CASES:
        bufs = {(n, k): (torch.randn(t, k, generator=g), torch.zeros(t, n)) for n, k in SHAPES.values()}
        ids = (torch.arange(t) % c).to(torch.int32)

        def step():
            for plan, n, k in plans:
                x, out = bufs[n, k]
                plan.add_(out, x, ids)

        step()
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
        read = per_carrier * min(c, t)
        print(f"T={t:<3} carriers={c}: {best * 1e3 / args.layers:7.3f} ms per layer, deltas at "
              f"{read / best / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
