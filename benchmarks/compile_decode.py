"""A bank-served model compiled with torch.compile, decode steps replayed with mixed carrier ids,
tokens compared with eager. On CUDA: ``mode="reduce-overhead"`` (the step is captured in a CUDA
graph and replayed) with CUDA's sync debug mode set to error around every compiled step, so a
host synchronisation inside the step fails the run. benchmarks/gpu_check.sh runs it; on the CPU
(``--device cpu``) it checks the same logic with the default mode.

The decode step is one forward over a fixed window of the last ``--window`` tokens per sequence
(no KV cache: the input shape stays fixed, so one graph serves every step), greedy next token.
Exit status 1 when a token differs from eager or a step recompiles after the first ids change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _carrier(seed):
    import lcdd_kernels as L
    from lcdd_kernels.models.patch import apply_lcdd
    from lcdd_kernels.models.tiny import tiny_model

    handle = apply_lcdd(tiny_model("qwen3", seed=seed), tiny_model("qwen3", seed=0), seed=seed,
                        init_mean=0.0, init_std=1.0)
    return L.extract_carrier(handle, include_theta=False)


def main(argv=None) -> int:
    import lcdd_kernels as L
    from lcdd_kernels.models.tiny import tiny_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    mode = args.mode or ("reduce-overhead" if device.type == "cuda" else None)

    carriers = [_carrier(s) for s in (1, 2, 3)]
    # the base the carriers were extracted against (built on the CPU: the same weights on any device)
    model = tiny_model("qwen3", seed=0).to(device, dtype).eval()
    model.requires_grad_(False)
    # in another dtype the weights' fingerprint differs from the fp32 one the carriers recorded
    bank = L.apply_carrier_bank(model, carriers, allow_fingerprint_mismatch=dtype != torch.float32)
    compiled = torch.compile(model, mode=mode, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    window = torch.randint(4, 90, (4, args.window), generator=g).to(device)
    # a different mix of carriers (and none) at every step; all ids change, the shapes do not
    choices = [[0, 1, 2, -1], [2, -1, 0, 1], [1, 1, -1, 2], [-1, 0, 2, 2]]
    sync_debug = device.type == "cuda"
    mismatches, t_first, t_steps, graphs_after_first = 0, None, [], None
    eager_win, comp_win = window.clone(), window.clone()
    with torch.no_grad():
        for step in range(args.steps):
            choice = choices[step % len(choices)]
            with bank.carriers(choice):
                ref = model(input_ids=eager_win).logits[:, -1].argmax(-1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if sync_debug and step >= 2:  # after warm-up and capture: replays only
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    out = compiled(input_ids=comp_win).logits[:, -1].argmax(-1)
                finally:
                    if sync_debug:
                        torch.cuda.set_sync_debug_mode(0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            if step == 0:
                t_first = dt
            else:
                t_steps.append(dt)
            if step == 1:
                graphs_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            mismatches += int((out != ref).sum())
            eager_win = torch.cat([eager_win[:, 1:], ref[:, None]], 1)
            comp_win = torch.cat([comp_win[:, 1:], out[:, None]], 1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result = {
        "device": str(device), "dtype": args.dtype, "mode": mode, "steps": args.steps, "window": args.window,
        "token_mismatches": mismatches, "graphs": graphs, "graphs_after_second_step": graphs_after_first,
        "first_call_s": t_first, "median_step_s": sorted(t_steps)[len(t_steps) // 2] if t_steps else None,
        "inductor_counters": {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in k},
        "sync_debug_error_mode": sync_debug,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    ok = mismatches == 0 and graphs == graphs_after_first
    print("OK: compiled decode tokens equal eager, no recompilation across carrier ids" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
