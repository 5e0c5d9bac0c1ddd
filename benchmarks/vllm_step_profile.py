"""Where a decode step's time goes when vLLM serves carriers natively (CPU).

    python benchmarks/vllm_step_profile.py [--repeats 5] [--layers 4]

Builds the serving benchmark's Qwen3-0.6B-shaped model and its four random carriers (s = 0.8;
:mod:`lcdd_kernels.bench.serving_qwen3`) in a temporary directory, then runs one vLLM engine with
LoRA on, in this process's child in the vLLM venv (``LCDD_VLLM_PYTHON`` or build/vllm-venv), with
the engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that every projection can be
timed: vLLM's GEMM (``UnquantizedLinearMethod.apply``), the plugin's hook
(``_apply_lora_to_output``) and the carrier kernel inside it (``CarrierPlan.add_``). Base requests,
one carrier and four carriers mixed are alternated ``--repeats`` times (16 requests x 32 new tokens,
decode time = the 32-token batch minus a 1-token batch); the medians are printed, and the hook's
and the kernel's time as a fraction of the GEMM's (ratios within one run, steadier than tokens/s
when other processes share the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def prepare(out: Path, layers: int) -> None:
    from lcdd_kernels.bench import serving_qwen3 as q
    from lcdd_kernels.bench.serving import _prompts
    from lcdd_kernels.serving import vllm_env

    model, tok = q.served_model(layers)
    carriers = [q.random_carrier(model, 0.8, s) for s in q.CARRIER_SEEDS]
    vllm_env.save_served_model(model, tok, out / "model")
    for i, c in enumerate(carriers):
        c.save(out / f"n{i}")
    (out / "prompts.json").write_text(json.dumps(_prompts(tok, 16)))


def engine(root: Path, repeats: int) -> None:  # runs in the vLLM venv
    import collections
    import statistics
    import time

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts = [{"prompt_token_ids": p} for p in json.loads((root / "prompts.json").read_text())]
    llm = LLM(model=str(root / "model"), tokenizer=str(root / "model"), dtype="float32", enable_lora=True,
              max_lora_rank=8, max_loras=4, max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1,
              seed=0)
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from lcdd_kernels.ops.carrier_plan import CarrierPlan

    spent = collections.Counter()

    def timed(cls, name, key):
        orig = getattr(cls, name)

        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(cls, name, run)

    timed(UnquantizedLinearMethod, "apply", "gemm")
    timed(BaseLinearLayerWithLoRA, "_apply_lora_to_output", "hook")
    timed(CarrierPlan, "add_", "kernel")

    def requests(mode):
        if mode == "base":
            return None
        names = [f"n{0 if mode == 'one carrier' else i % 4}" for i in range(len(prompts))]
        return [LoRARequest(n, int(n[1]) + 1, str(root / n)) for n in names]

    def generate(mode, n):
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False),
                     lora_request=requests(mode), use_tqdm=False)
        return time.perf_counter() - t

    modes = ["base", "one carrier", "4 carriers mixed"]
    for m in modes:
        generate(m, 32)
    got = {m: collections.defaultdict(list) for m in modes}
    for _ in range(repeats):
        for m in modes:
            spent.clear()
            full = generate(m, 32)
            parts = dict(spent)
            got[m]["decode_s"].append(full - generate(m, 1))
            for k in ("gemm", "hook", "kernel"):
                got[m][k].append(parts.get(k, 0.0))
    print("mode               decode ms  tok/s   GEMM ms  hook-kernel/GEMM  kernel/GEMM")
    for m in modes:
        med = {k: statistics.median(v) for k, v in got[m].items()}
        n_tok = len(prompts) * 31
        print(f"{m:<18} {med['decode_s'] * 1e3:9.0f}  {n_tok / med['decode_s']:6.1f}  {med['gemm'] * 1e3:7.0f}"
              f"  {(med['hook'] - med['kernel']) / med['gemm']:16.3f}  {med['kernel'] / med['gemm']:11.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # the child's directory
    args = p.parse_args()
    if args.engine:
        engine(Path(args.engine), args.repeats)
        return 0
    from lcdd_kernels.serving import vllm_env

    reason = vllm_env.available()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="lcdd-step-profile-") as tmp:
        prepare(Path(tmp), args.layers)
        env = dict(vllm_env.env(), VLLM_ENABLE_V1_MULTIPROCESSING="0")
        return subprocess.call([str(vllm_env.vllm_python()), os.path.abspath(__file__), "--engine", tmp,
                                "--repeats", str(args.repeats)], env=env)


if __name__ == "__main__":
    sys.exit(main())
