"""``lcdd check-kernels``: every GPU kernel of the package compiled for Hopper (sm_90) and Ampere
(sm_80) without a GPU, and checked for compile errors and register spills.

How (each step its own module):

* :mod:`.discovery` finds every ``@triton.jit`` function in the package's sources (AST scan, so a
  new kernel is found without being listed anywhere);
* :mod:`.scenarios` calls the package's real host launchers (forward and backward of every op,
  each design, every gradient combination, every dtype) with small CPU tensors whose sizes are
  model-like (dims divisible by 16), and :mod:`.record` intercepts each kernel launch instead of
  running it, keeping the exact arguments, constexprs and, for autotuned kernels, every config of
  the autotune list; with ``LCDD_TRITON_AUTOTUNE=0`` a second pass records the fixed configs;
* :mod:`.compile` compiles each recorded launch for each arch through Triton's own launch path
  (the JIT's binder gives the specialisation — 16-byte alignment of pointers, divisibility of
  integers — then ``ASTSource`` + ``triton.compile`` for a ``GPUTarget``), and :mod:`.sass`
  reads ptxas's resource report and the SASS (local loads/stores, the MMA instruction used);
  :mod:`.occupancy` turns registers, shared memory and warps into resident warps per SM;
* :mod:`.cuda_sources` compiles the CUDA sources with ``nvcc -Xptxas -v`` for the same archs;
* :mod:`.runner` runs all of it in a process pool with a result cache keyed by the kernel's
  source hash, the Triton version and the launch, and :mod:`.report` writes the JSON table and
  the summary. A Triton kernel no launch reaches (and that no launched kernel calls) is an error.
"""

from __future__ import annotations

__all__ = ["check_kernels"]


def check_kernels(*args, **kwargs):
    """See :func:`lcdd_kernels.kernel_check.runner.check_kernels`."""
    from .runner import check_kernels as run

    return run(*args, **kwargs)
