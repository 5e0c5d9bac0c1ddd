"""Compile one recorded launch for one GPU arch the way ``kernel[grid](...)`` would, without a GPU.

The steps are those of ``JITFunction.run`` (Triton 3.5 to 3.9): the JIT's own binder
(``create_function_from_signature``) maps the arguments to a signature and a specialisation —
which pointers are 16-byte aligned, which integers divisible by 16 or equal to 1 —,
``JITFunction._pack_args`` turns that into constexprs and attributes, and ``triton.compile``
builds ``ASTSource(fn, signature, constexprs, attrs)`` for ``GPUTarget("cuda", cc, 32)``. Only
the device queries are replaced by the target. ptxas's resource report (``-v``, which Triton
passes and prints when ``dump_ptxas_log`` is on) is captured from that compile.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import tempfile

from . import sass
from .occupancy import occupancy
from .record import Launch, decode

#: The Triton API this module relies on, checked up front so a version without it fails clearly.
_API = ("triton.runtime.jit.create_function_from_signature", "triton.runtime.jit.JITFunction._pack_args",
        "triton.compiler.ASTSource", "triton.compiler.make_backend", "triton.backends.compiler.GPUTarget")


def api_problems() -> list[str]:
    """What of the Triton API above this Triton lacks (empty when all is there)."""
    missing = []
    for path in _API:
        mod, _, attr = path.rpartition(".")
        try:
            obj = importlib.import_module(mod)
        except ImportError:
            mod, _, cls = mod.rpartition(".")
            obj = getattr(importlib.import_module(mod), cls, None)
        if obj is None or not hasattr(obj, attr):
            missing.append(path)
    return missing


def jit_function(module: str, name: str):
    """The JITFunction ``name`` of ``module`` (unwrapping autotune/heuristics wrappers)."""
    obj = getattr(importlib.import_module(module), name)
    while not hasattr(obj, "params") and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def _binder_inputs(fn, launch: Launch, keep: list):
    values = dict(zip([p.name for p in fn.params if not p.is_constexpr], (decode(a, keep) for a in launch.args)))
    kwargs = {k: decode(v, keep) for k, v in launch.kwargs}
    return values, kwargs


def compile_kernel(launch: Launch, cc: int):
    """``launch`` compiled for compute capability ``cc``: (the JITFunction, Triton's
    CompiledKernel — what a real launch caches —, ptxas's report, the signature, the attrs)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(launch.module, launch.kernel)
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    keep: list = []
    values, kwargs = _binder_inputs(fn, launch, keep)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    call = {**values, **kwargs}
    bound, specialization, options = binder(**call)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    out = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(out):
            kernel = triton_compile(src, target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    return fn, kernel, out.getvalue(), signature, attrs


def compile_launch(launch: Launch, cc: int) -> dict:
    """Compile ``launch`` for compute capability ``cc`` (80, 90); the record of :mod:`.report`."""
    fn, kernel, log, signature, attrs = compile_kernel(launch, cc)
    usage = sass.ptxas_usage(log, kernel.metadata.name)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        code = sass.disassemble(cubin)
    counts = sass.sass_counts(code)
    shared = int(kernel.metadata.shared)
    warps = int(kernel.metadata.num_warps)
    return {
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "aligned": aligned(fn, attrs),
        "registers": usage["registers"],
        "spill_store_bytes": usage["spill_store_bytes"],
        "spill_load_bytes": usage["spill_load_bytes"],
        "stack_bytes": usage["stack_bytes"],
        "local_loads": counts["local_loads"],
        "local_stores": counts["local_stores"],
        "shared_bytes": shared,
        "num_warps": warps,
        "num_stages": int(getattr(kernel.metadata, "num_stages", 0) or 0),
        "mma": counts["mma"],
        **occupancy(cc, usage["registers"], shared, warps),
    }


def aligned(fn, attrs) -> list[str]:
    """The arguments the JIT's attrs mark divisible by 16 (pointers aligned, integers), sorted."""
    names = [p.name for p in fn.params]
    return sorted({names[path[0]] for path, vals in attrs.items() if any(a and a[0] == "tt.divisibility" for a in vals)})
