"""benchmarks/gpu_check.sh's plumbing, on this CPU machine: stage selection (GPU_CHECK_ONLY), the
summary at the head of log.txt, at most 8 files back (the device tool's limit), kernels-gpu.json
always written. The stages themselves need the GPU; here only `env` runs (and fails: no
nvidia-smi), which is recorded and does not stop the script."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _stages() -> list[str]:
    names = re.findall(r"^\s*stage ([a-z0-9-]+) ", SCRIPT.read_text(), flags=re.M)
    return names + [f"bench-{s}" for s in ("carrier", "eraser", "lcdd-step")]


def test_selected_stage_runs_the_rest_are_listed_and_the_results_come_back(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_ONLY": "env"}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "log.txt" in files and "kernels-gpu.json" in files, files
    assert not [f for f in files if f.endswith(".tmp")], files
    log = (out / "log.txt").read_text()
    head = log.split("\n\n", 1)[0].splitlines()
    assert head[0] == "===== summary" and head[1].startswith("gpu_check.sh  commit ")
    status = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in head[3:] if ":" in line}
    assert re.match(r" rc=\d+ (ok|FAILED)", status["env"]), status["env"]
    for name in set(_stages()) - {"env", "bench-serving"}:
        assert "not selected" in status.get(name, ""), (name, status.get(name))
    assert head[-1].startswith("total: ")
    assert "===== env:" in log  # the stage's own output follows the summary
    assert json.loads((out / "kernels-gpu.json").read_text()) == {"device_vs_check": None, "roofline": None}
