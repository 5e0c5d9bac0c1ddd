"""Runs inside the vLLM venv (``make test-vllm`` builds it): offline vLLM batches described by a
JSON job, results as JSON. It imports nothing from lcdd_kernels, so that the vLLM venv needs only
vLLM; :mod:`lcdd_kernels.serving.vllm_env` writes the job and reads the results.

    python vllm_runner.py JOB.json OUT.json

Job: ``{"model", "dtype", "max_lora_rank", "max_model_len", "adapters": {name: dir}, "runs": [{"name",
"max_loras", "batches": [{"name", "max_tokens", "logprobs", "requests": [{"prompt_token_ids",
"adapter"}], "expect_error"}]}]}``. Each run starts one ``LLM`` (its own ``max_loras``, and optionally
its own ``max_lora_rank``, ``enable_lora`` and ``tensor_parallel_size``); each batch is one
``generate`` call with every request submitted at once. Results per batch: per request the
generated token ids and their log-probs (a batch with ``expect_error``: the error vLLM raised, or
None), and the batch's wall time (median of ``repeats`` after
``warmup`` untimed calls); per run the engine's start time.
vLLM's workers are spawned processes: everything runs under the ``__main__`` guard.
"""

import json
import os
import sys
import time


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = job.get("adapters", {})
    ids = {name: i + 1 for i, name in enumerate(adapters)}  # vLLM's lora_int_id: 1, 2, ... (0 means none)
    out = {"vllm_version": __import__("vllm").__version__, "runs": []}
    for spec in job["runs"]:
        t0 = time.perf_counter()
        lora = spec.get("enable_lora", bool(adapters))
        tp = spec.get("tensor_parallel_size", 1)
        # vLLM's multiprocessing executor: one worker process per rank, collectives over gloo/shm
        parallel = {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"} if tp > 1 else {}
        llm = LLM(model=job["model"], tokenizer=job["model"], dtype=job.get("dtype", "float32"),
                  enable_lora=lora, max_lora_rank=spec.get("max_lora_rank", job.get("max_lora_rank", 8)),
                  max_loras=spec.get("max_loras", max(1, len(adapters))), max_model_len=job.get("max_model_len", 256),
                  enforce_eager=True, gpu_memory_utilization=0.1, seed=0,
                  max_num_seqs=job.get("max_num_seqs", 256), **parallel)
        start_s = time.perf_counter() - t0
        batches = []
        for b in spec["batches"]:
            params = SamplingParams(temperature=0.0, max_tokens=b["max_tokens"], ignore_eos=True,
                                    logprobs=b.get("logprobs"), detokenize=False)
            prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in b["requests"]]
            loras = [LoRARequest(r["adapter"], ids[r["adapter"]], adapters[r["adapter"]]) if r.get("adapter") else None
                     for r in b["requests"]]
            if b.get("expect_error"):  # a request vLLM must refuse: its message, and the engine goes on
                try:
                    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
                except Exception as e:  # noqa: BLE001 - the refusal's type is vLLM's
                    batches.append({"name": b["name"], "error": f"{type(e).__name__}: {e}"})
                else:
                    batches.append({"name": b["name"], "error": None})
                continue
            for _ in range(b.get("warmup", 0)):
                llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            walls = []
            for _ in range(max(1, b.get("repeats", 1))):
                t1 = time.perf_counter()
                results = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
                walls.append(time.perf_counter() - t1)
            wall = sorted(walls)[len(walls) // 2]
            reqs = []
            for res in results:
                o = res.outputs[0]
                lps = None
                if o.logprobs is not None:
                    lps = [step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids)]
                reqs.append({"token_ids": list(o.token_ids), "logprobs": lps})
            batches.append({"name": b["name"], "wall_s": wall, "walls_s": walls, "requests": reqs})
        out["runs"].append({"name": spec["name"], "max_loras": spec.get("max_loras"), "start_s": start_s,
                            "batches": batches})
        del llm
    return out


def main() -> int:
    job_path, out_path = sys.argv[1], sys.argv[2]
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    result = run(job)
    # lcdd_kernels.atomic.write_file_atomic's steps inline (this file imports nothing from the package)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    fd = os.open(os.path.dirname(os.path.abspath(out_path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
