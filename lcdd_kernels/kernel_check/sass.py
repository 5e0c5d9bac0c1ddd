"""Read what ptxas and the SASS say about a compiled kernel: registers, spills, local memory
traffic, and the MMA instruction the inner loop uses."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess

_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
#: The opcode of a SASS line: "/*0190*/   @!P0 LDL.64 R4, [R1+0x10] ;" -> LDL.64
_OPCODE = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[A-Z0-9_.]+)?\b")


def ptxas_usage(log: str, name: str) -> dict:
    """Registers and spill/stack bytes of entry ``name`` from a ``ptxas -v`` log."""
    start = log.find(f"Compiling entry function '{name}'")
    part = log[start:] if start >= 0 else log
    used, frame = _USED.search(part), _FRAME.search(part)
    if used is None or frame is None:
        raise RuntimeError(f"kernel_check: no ptxas resource report for {name} in the compile log:\n{log[-2000:]}")
    return {"registers": int(used.group(1)), "stack_bytes": int(frame.group(1)),
            "spill_store_bytes": int(frame.group(2)), "spill_load_bytes": int(frame.group(3))}


def tool(name: str) -> str:
    """A CUDA binary tool: the one inside the triton wheel (the version Triton compiles with),
    else one on PATH."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"kernel_check: {name} is neither in the triton wheel nor on PATH")
    return found


def disassemble(cubin: str) -> str:
    return subprocess.run([tool("cuobjdump"), "-sass", cubin], check=True, capture_output=True, text=True).stdout


def opcodes(code: str) -> collections.Counter:
    return collections.Counter(m.group(1) for m in _OPCODE.finditer(code))


def sass_counts(code: str) -> dict:
    """Local loads/stores (spill traffic, or local arrays) and the MMA kind in SASS text."""
    ops = opcodes(code)
    if ops["HGMMA"]:
        mma = "wgmma"
    elif ops["HMMA"]:
        mma = "mma.sync"
    elif ops["FFMA"] or ops["DFMA"]:
        mma = "fma"
    else:
        mma = "none"
    return {"local_loads": ops["LDL"], "local_stores": ops["STL"], "mma": mma}
