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
``warmup`` untimed calls); per run the engine's start time. With ``"interleave": true`` every run's
engine is started first and the runs' timed batches alternate, repeat after repeat (benchmarks).
vLLM's workers are spawned processes: everything runs under the ``__main__`` guard.
"""

import json
import os
import sys
import time


def _engine(job: dict, spec: dict):
    from vllm import LLM

    adapters = job.get("adapters", {})
    lora = spec.get("enable_lora", bool(adapters))
    tp = spec.get("tensor_parallel_size", 1)
    # vLLM's multiprocessing executor: one worker process per rank, collectives over gloo/shm
    parallel = {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"} if tp > 1 else {}
    return LLM(model=job["model"], tokenizer=job["model"], dtype=job.get("dtype", "float32"),
               enable_lora=lora, max_lora_rank=spec.get("max_lora_rank", job.get("max_lora_rank", 8)),
               max_loras=spec.get("max_loras", max(1, len(adapters))), max_model_len=job.get("max_model_len", 256),
               enforce_eager=True, gpu_memory_utilization=0.1, seed=0,
               max_num_seqs=job.get("max_num_seqs", 256), **parallel)


def _call(job: dict, b: dict):
    """Batch ``b`` as one function: call(llm) runs its ``generate`` and returns (results, seconds)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = job.get("adapters", {})
    ids = {name: i + 1 for i, name in enumerate(adapters)}  # vLLM's lora_int_id: 1, 2, ... (0 means none)
    params = SamplingParams(temperature=0.0, max_tokens=b["max_tokens"], ignore_eos=True,
                            logprobs=b.get("logprobs"), detokenize=False)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in b["requests"]]
    loras = [LoRARequest(r["adapter"], ids[r["adapter"]], adapters[r["adapter"]]) if r.get("adapter") else None
             for r in b["requests"]]

    def call(llm):
        t1 = time.perf_counter()
        results = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        return results, time.perf_counter() - t1
    return call


def _batch_result(name: str, results, walls: list) -> dict:
    reqs = []
    for res in results:
        o = res.outputs[0]
        lps = None
        if o.logprobs is not None:
            lps = [step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids)]
        reqs.append({"token_ids": list(o.token_ids), "logprobs": lps})
    return {"name": name, "wall_s": sorted(walls)[len(walls) // 2], "walls_s": walls, "requests": reqs}


def run(job: dict) -> dict:
    if job.get("interleave"):
        return run_interleaved(job)
    out = {"vllm_version": __import__("vllm").__version__, "runs": []}
    for spec in job["runs"]:
        t0 = time.perf_counter()
        llm = _engine(job, spec)
        start_s = time.perf_counter() - t0
        batches = []
        for b in spec["batches"]:
            call = _call(job, b)
            if b.get("expect_error"):  # a request vLLM must refuse: its message, and the engine goes on
                try:
                    call(llm)
                except Exception as e:  # noqa: BLE001 - the refusal's type is vLLM's
                    batches.append({"name": b["name"], "error": f"{type(e).__name__}: {e}"})
                else:
                    batches.append({"name": b["name"], "error": None})
                continue
            for _ in range(b.get("warmup", 0)):
                call(llm)
            walls = []
            for _ in range(max(1, b.get("repeats", 1))):
                results, wall = call(llm)
                walls.append(wall)
            batches.append(_batch_result(b["name"], results, walls))
        out["runs"].append({"name": spec["name"], "max_loras": spec.get("max_loras"), "start_s": start_s,
                            "batches": batches})
        del llm
    return out


def run_interleaved(job: dict) -> dict:
    """Every run's engine started first, then the timed batches of all runs in turn, repeat after
    repeat: a change in the CPU's speed during the job (other processes, frequency) falls on every
    run alike, where runs one after another would each see a different speed. Batches that expect
    an error are not supported here."""
    for spec in job["runs"]:  # refused before vLLM is imported or any engine starts
        if any(b.get("expect_error") for b in spec["batches"]):
            raise ValueError(f"run {spec['name']!r}: batches with expect_error cannot be interleaved")
    out = {"vllm_version": __import__("vllm").__version__, "runs": []}
    engines, calls = [], []
    for spec in job["runs"]:
        t0 = time.perf_counter()
        engines.append(_engine(job, spec))
        out["runs"].append({"name": spec["name"], "max_loras": spec.get("max_loras"),
                            "start_s": time.perf_counter() - t0, "batches": []})
        calls.append([_call(job, b) for b in spec["batches"]])
    for llm, spec, cs in zip(engines, job["runs"], calls):
        for b, call in zip(spec["batches"], cs):
            for _ in range(b.get("warmup", 0)):
                call(llm)
    walls = [[[] for _ in spec["batches"]] for spec in job["runs"]]
    last = [[None for _ in spec["batches"]] for spec in job["runs"]]
    rounds = max(max(1, b.get("repeats", 1)) for spec in job["runs"] for b in spec["batches"])
    for r in range(rounds):
        for i, (llm, spec) in enumerate(zip(engines, job["runs"])):
            for j, b in enumerate(spec["batches"]):
                if r < max(1, b.get("repeats", 1)):
                    last[i][j], wall = calls[i][j](llm)
                    walls[i][j].append(wall)
    for i, spec in enumerate(job["runs"]):
        out["runs"][i]["batches"] = [_batch_result(b["name"], last[i][j], walls[i][j])
                                     for j, b in enumerate(spec["batches"])]
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
