"""The CUDA sources (csrc/cuda/*.cu) through ``nvcc -Xptxas -v`` for each arch: every kernel
instantiation's registers and spill bytes, as ptxas reports them. Flags as the CMake build's
(C++17, --expt-relaxed-constexpr, -O3)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

_FUNC = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse(log: str, arch: str, source: str) -> list[dict]:
    rows = []
    for block in log.split("ptxas info    : Compiling entry function")[1:]:
        block = "ptxas info    : Compiling entry function" + block
        m, props, used = _FUNC.search(block), _PROPS.search(block), _USED.search(block)
        if not (m and props and used):
            continue
        spill = int(props.group(2)) + int(props.group(3))
        rows.append({"function": m.group(1), "source": source, "arch": arch, "registers": int(used.group(1)),
                     "stack_bytes": int(props.group(1)), "spill_store_bytes": int(props.group(2)),
                     "spill_load_bytes": int(props.group(3)), "status": "spill" if spill else "ok"})
    return rows


def check(archs, root: str | None = None, echo=print) -> list[dict]:
    repo = pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parents[2]
    sources = sorted((repo / "csrc" / "cuda").glob("*.cu"))
    nvcc = shutil.which("nvcc")
    if not sources:
        return []
    if nvcc is None:
        # As the CMake build does without nvcc: no CUDA kernels are built, so none is checked; said loudly.
        echo("  CUDA: nvcc not on PATH, the CUDA sources are NOT checked (install the CUDA toolkit to check them)")
        return [{"function": "-", "source": str(s.relative_to(repo)), "arch": f"sm_{cc}", "status": "skipped",
                 "error": "nvcc not on PATH"} for s in sources for cc in archs]
    rows = []
    for src in sources:
        for cc in archs:
            cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo", f"-arch=sm_{cc}",
                   "-Xptxas", "-v", "-I", str(repo / "csrc" / "include"), "-c", str(src), "-o", "/dev/null"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            rel = str(src.relative_to(repo))
            if proc.returncode:
                rows.append({"function": "-", "source": rel, "arch": f"sm_{cc}", "status": "error",
                             "error": proc.stderr.strip()[-1500:]})
                continue
            rows += parse(proc.stderr + proc.stdout, f"sm_{cc}", rel)
    names = _demangle([r["function"] for r in rows])
    for r in rows:
        r["mangled"], r["function"] = r["function"], names.get(r["function"], r["function"])
    echo(f"  CUDA: {len(sources)} sources x {len(archs)} archs, {len(rows)} kernel instantiations")
    return rows
