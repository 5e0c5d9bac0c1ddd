#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, build the extension in place, run the test suite and
# the GPU benchmarks, and leave logs and JSON results in $OUT, all within 8 minutes.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh        # from anywhere; default OUT=./gpu-out
#
# Made for the team's H200 machine (torch 2.11, triton 3.6, nvcc; no network): the Python is
# /opt/torch/.venv/bin/python3 when present (override with PYTHON=...), nothing is installed, the
# package runs from the source tree (PYTHONPATH). Every stage runs under `timeout` inside one
# overall budget; a failed or timed-out stage is recorded and the next one still runs.
# What comes back (at most 8 files, the device tool's limit): log.txt (first the summary, one line
# per stage: exit status, seconds; then every stage's output), training-gpu.json, designs-gpu.json
# (Triton fused vs split), <suite>-gpu.json for each hook suite (carrier, eraser, lcdd-step),
# serving-gpu.json where vLLM is installed, and kernels-gpu.json (the kernel check on the device
# against the driver, and every measured kernel as a fraction of its roofline floor). The training
# plot is drawn from training-gpu.json afterwards (`lcdd bench plot training-gpu.json`), not here.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=$(command -v python3)
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}   # 8 minutes, less a margin for copying results back
START=$(date +%s)
SUMMARY=$OUT/summary.tmp   # folded into the head of log.txt at the end
LOG=$OUT/log.txt
: >"$SUMMARY"
: >"$LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export LCDD_CUDA_ARCHS=${LCDD_CUDA_ARCHS:-90}
LCDD=("$PY" -m lcdd_kernels.cli)

# GPU_CHECK_ONLY="name name ...": run only these stages (the rerun after a fix, or the stages the
# first run's budget skipped); the others are listed as not selected.
ONLY=${GPU_CHECK_ONLY:-}

# stage NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout (CAP, clipped to the time left),
# appends its output to log.txt and one status line to the summary (the head of log.txt). Never stops the script.
stage() {
    local name=$1 cap=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        echo "$name: not selected (GPU_CHECK_ONLY)" >>"$SUMMARY"
        return 0
    fi
    local left=$((BUDGET_S - ($(date +%s) - START) - 5))
    ((cap > left)) && cap=$left
    if ((cap < 10)); then
        echo "$name: SKIPPED (overall budget spent)" >>"$SUMMARY"
        return 0
    fi
    echo "===== $name: $* (cap ${cap}s, $(date -u +%FT%TZ))" >>"$LOG"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1
    rc=$?
    if ((rc == 124 || rc == 137)); then status="TIMEOUT after ${cap}s"
    elif ((rc == 0)); then status=ok
    else status=FAILED; fi
    echo "$name: rc=$rc $status ($(($(date +%s) - t0))s)" >>"$SUMMARY"
    echo "===== $name: rc=$rc" >>"$LOG"
    return 0
}

{
    echo "gpu_check.sh  commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)  $(date -u +%FT%TZ)"
    echo "python $PY"
} >>"$SUMMARY"

# 1. What machine this is (GPU, driver, versions, which backends can run).
# shellcheck disable=SC2016  # $0 expands in the inner shell: it is the Python
stage env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2; "$0" -m lcdd_kernels.cli env' "$PY"

# 2. Build lcdd_kernels._C (C++ and CUDA, sm_90) in place. The package works without it, so a
#    failed build is recorded and the tests still run (they then report what needs it).
stage build 150 "$PY" setup.py build_ext --inplace

# 3. The whole test suite on the GPU (bf16 and the real Triton/CUDA kernels run here), with one
#    Triton config instead of autotuning every test shape.
#    The kernel suites run first (they are what only a GPU can check), then the rest; each stops
#    after 25 failures rather than at the first, since one GPU run has to show them all.
PYTEST_OPTS=(-q -p no:cacheprovider --maxfail=25 --durations=10)
"$PY" -c "import pytest_benchmark" 2>/dev/null || PYTEST_OPTS+=(-o "addopts=-ra")
KERNEL_TESTS=(tests/ops/test_masked_delta.py tests/ops/test_masked_delta_triton.py tests/ops/test_masked_delta_memory_and_errors.py
              tests/ops/test_carrier.py tests/carriers/test_bank.py tests/ops/test_gather.py tests/eraser/test_eraser.py)
stage tests-kernels 150 env LCDD_TRITON_AUTOTUNE=0 "$PY" -m pytest "${KERNEL_TESTS[@]}" "${PYTEST_OPTS[@]}"
# 3a. The kernel check's prediction against the driver, early because it is short: the
#     check here (bf16, sm_90, the fixed configs the tests use), then the same scenarios launched for
#     real and every compiled kernel's n_regs / n_spills compared with its row (kernels-gpu.json).
KC_TMP=$(mktemp -d)
stage check-kernels 60 "${LCDD[@]}" check-kernels --archs 90 --dtypes bfloat16 --no-cuda --fixed-configs-only \
    --cache-dir "$KC_TMP" --out "$OUT/kc-table.tmp"
stage kernels-vs-driver 60 env LCDD_TRITON_AUTOTUNE=0 "$PY" -m lcdd_kernels.kernel_check.device "$OUT/kc-table.tmp" \
    --dtypes bfloat16 --out "$OUT/kc-device.tmp"
rm -rf "$KC_TMP"

# The compile stage's tests run there (test_library_ops on CUDA); test_compile.py is CPU-only.
COMPILE_TESTS=(tests/ops/test_library_ops.py tests/ops/test_compile.py)
stage tests-rest 60 env LCDD_TRITON_AUTOTUNE=0 "$PY" -m pytest tests "${KERNEL_TESTS[@]/#/--deselect=}" \
    "${COMPILE_TESTS[@]/#/--deselect=}" "${PYTEST_OPTS[@]}"

# 3b. torch.compile: opcheck of every registered op on CUDA tensors (Triton, CUDA _C and torch
#     backends), then a bank-served model compiled with mode="reduce-overhead": decode steps
#     replayed from a CUDA graph with mixed carrier ids, sync debug mode "error" around each
#     replay, tokens compared with eager (exit 1 on a mismatch or a recompilation).
stage compile-opcheck 60 env LCDD_TRITON_AUTOTUNE=0 "$PY" -m pytest tests/ops/test_library_ops.py -k cuda \
    "${PYTEST_OPTS[@]}"
stage compile-cudagraph 60 "$PY" benchmarks/compile_decode.py --device cuda --dtype bfloat16  # JSON in log.txt

# 4. Benchmarks, bf16 on the GPU (Triton autotuned unless GPU_BENCH_AUTOTUNE=0). Results are
#    written after every shape, so a timeout keeps what was measured. GPU_BENCH_FULL=1 adds T=2048
#    to the target's T=8192.
export LCDD_TRITON_AUTOTUNE=${GPU_BENCH_AUTOTUNE:-1}
QUICK=--quick
[ "${GPU_BENCH_FULL:-0}" = 1 ] && QUICK=
stage bench-training 120 "${LCDD[@]}" bench training --device cuda --dtype bfloat16 $QUICK \
    --out "$OUT/training-gpu.json" --force

# 5. The two Triton designs side by side over T (full fwd+bwd): where split overtakes fused sets
#    FUSED_MAX_TOKENS in lcdd_kernels/ops/masked_delta_triton.py.
stage bench-designs 45 "${LCDD[@]}" bench training --device cuda --dtype bfloat16 --modes full \
    --providers dense,lcdd-fused,lcdd-split --T 256,1024,4096 --no-memory --out "$OUT/designs-gpu.json" --force

# ---- HOOKS: the other suites. Each one registered in lcdd_kernels/cli/bench.py (SUITES) runs here
# ---- with the common options, into $OUT/<suite>-gpu.json; a suite not registered yet is skipped.
# ---- Keep each under its cap (seconds) and the whole script under 8 minutes: one results file each.
# ---- carrier: the CPU table's providers (base, naive, checked, lcdd, plan = CarrierPlan) for T = 1,
# ---- 16, 512 and 0 / 1 / 4 carriers, each row against the GPU's copy bandwidth measured in the run.
for hook in "carrier 45" "eraser 45" "lcdd-step 45"; do
    read -r suite cap <<<"$hook"
    if "${LCDD[@]}" bench "$suite" --help >/dev/null 2>&1; then
        stage "bench-$suite" "$cap" "${LCDD[@]}" bench "$suite" --device cuda --dtype bfloat16 --quick \
            --out "$OUT/$suite-gpu.json" --force
    else
        echo "bench-$suite: not registered yet (hook skipped)" >>"$SUMMARY"
    fi
done

# 6. Serving: the Qwen3-shaped group of `lcdd bench serving` (4 decoder layers): vLLM without
#    adapters, four carriers natively through the package's plugin, the same four as exact LoRA, side
#    by side (three engine starts). Only where vLLM is installed for this python; skipped otherwise.
if "$PY" -c "import vllm" >/dev/null 2>&1; then
    stage bench-serving 150 env LCDD_VLLM_PYTHON="$PY" "${LCDD[@]}" bench serving --device cuda --quick \
        --groups qwen3 --layers 4 --out "$OUT/serving-gpu.json" --force
else
    echo "bench-serving: vLLM is not installed for $PY (stage skipped)" >>"$SUMMARY"
fi

# 7. Every measured row as a fraction of its floor (benchmarks/results/roofline-h200.json), into
#    kernels-gpu.json beside the device-vs-check comparison of stage 3a.
stage roofline 20 "$PY" -m lcdd_kernels.bench.roofline compare "$OUT/training-gpu.json" "$OUT/designs-gpu.json" \
    "$OUT/carrier-gpu.json" --out "$OUT/roofline.tmp"
"$PY" - "$OUT" <<'PYEOF' >>"$LOG" 2>&1
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
part = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
(out / "kernels-gpu.json").write_text(json.dumps(
    {"device_vs_check": part("kc-device.tmp"), "roofline": part("roofline.tmp")}, indent=1) + "\n")
PYEOF

echo "total: $(($(date +%s) - START))s of ${BUDGET_S}s" >>"$SUMMARY"
{ echo "===== summary"; cat "$SUMMARY"; echo; cat "$LOG"; } >"$OUT/log.new" && mv "$OUT/log.new" "$LOG"
cat "$SUMMARY"
rm -f "$OUT"/*.tmp  # a results file interrupted mid-write, the parts merged above, the summary
