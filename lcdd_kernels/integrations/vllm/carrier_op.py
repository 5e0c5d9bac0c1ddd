"""The one call from vLLM's projections into the package's carrier kernels.

vLLM computes each projection's base output itself (its own GEMM, on a CPU over a prepacked weight
that no longer exists as a tensor), so the plugin adds only the carriers: for every token ``t``
whose LoRA slot holds a carrier, ``out[t, rows] += x[t, cols]·Δᵀ``. That is the carrier add of
the package's table path (:mod:`lcdd_kernels.ops.carrier`: the C++ kernel on a CPU, the Triton
kernel on a GPU, PyTorch otherwise) on the same :class:`~lcdd_kernels.ops.carrier.CarrierTable`
that ``bank_linear`` reads, over vLLM's token-to-slot mapping. Everything the plugin serves goes
through :func:`add_carriers_`, so a prepared (validate-once) carrier path replaces it here alone.
"""

from __future__ import annotations

import torch

from ... import _backend
from ...ops import _native
from ...ops.carrier import CarrierTable, _select, _torch_add_, route


def add_carriers_(out: torch.Tensor, x: torch.Tensor, table: CarrierTable, ids: torch.Tensor) -> torch.Tensor:
    """``out[t, rows_c] += x[t, cols_c]·Δ_cᵀ`` with ``c = ids[t]`` for every token whose slot
    ``c`` holds a carrier (−1 and empty slots: nothing). ``out``: (T, N), ``x``: (T, K),
    ``ids``: (T,) int32 slot per token on x's device. Returns ``out`` (updated in place)."""
    n_tok = x.shape[0]
    if not (out.is_contiguous() and x.stride(-1) == 1 and x.stride(0) >= x.shape[1]):
        x = x.contiguous()
    name = _select("bank_linear", x, n_tok, None)
    if name == "cpp" and out.is_contiguous():
        _native.lib().carrier_add_cpu(_native.ptr(x), x.stride(0), _native.ptr(out), n_tok, out.shape[1],
                                      x.shape[1], _native.DTYPE[x.dtype], _native.ptr(table.views), len(table),
                                      _native.ptr(ids))
    elif name in ("cuda", "triton") and out.is_contiguous() and _backend.triton_available():
        from ...ops import carrier_triton

        tok, seg = route(ids, len(table), n_tok, x.device)
        carrier_triton.carrier_add_(out, x, table.views, tok, seg, table.max_rows)
    else:
        _torch_add_(out, x, table.deltas, table.rows, table.cols, ids)
    return out
