"""Calling ``lcdd_kernels._C``: the C API's dtype enums and raw pointers from tensors.

Only reached after an op has validated its arguments (shape, dtype, device, contiguity or
strides), so every pointer that crosses here is known to be good for the sizes passed with it.
"""

from __future__ import annotations

import torch

#: torch dtype -> lcdd_dtype (csrc/include/lcdd/lcdd.h)
DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
#: torch dtype -> lcdd_index_dtype
INDEX = {torch.int32: 0, torch.int64: 1}


_threads = None
_C = None


def lib():
    """The extension, with its CPU thread count kept equal to PyTorch's (two OpenMP pools of
    different sizes on the same cores would oversubscribe them). Called per op: the module is
    imported once (an import statement per call costs a microsecond)."""
    global _threads, _C
    if _C is None:
        from .. import _C as module

        _C = module
    n = torch.get_num_threads()
    if n != _threads:
        _C.set_num_threads(n)
        _threads = n
    return _C


def ptr(t: torch.Tensor | None) -> int:
    """The address of ``t``'s first element (0 for None), as the bindings take it."""
    return 0 if t is None else t.data_ptr()


def stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer handle (0 on the CPU)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
