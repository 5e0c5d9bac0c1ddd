"""The one call from vLLM's projections into the package's carrier kernels.

vLLM computes each projection's base output itself (its own GEMM, on a CPU over a prepacked weight
that no longer exists as a tensor), so the plugin adds only the carriers: for every token ``t``
whose LoRA slot holds a carrier, ``out[t, rows] += x[t, cols]·Δᵀ``. That is the carrier add of
the package's table path (:mod:`lcdd_kernels.ops.carrier`: the C++ kernel on a CPU, the Triton
kernel on a GPU, PyTorch otherwise) on the same :class:`~lcdd_kernels.ops.carrier.CarrierTable`
that ``bank_linear`` reads, over vLLM's token-to-slot mapping. Everything the plugin serves goes
through :func:`add_carriers_`: the prepared path (:class:`~lcdd_kernels.ops.carrier_plan.CarrierPlan`,
indices checked once when a carrier enters its slot, nothing checked per call).
"""

from __future__ import annotations

import torch

from ...ops.carrier_plan import CarrierPlan


def add_carriers_(out: torch.Tensor, x: torch.Tensor, plan: CarrierPlan, ids: torch.Tensor) -> torch.Tensor:
    """``out[t, rows_c] += x[t, cols_c]·Δ_cᵀ`` with ``c = ids[t]`` for every token whose slot
    ``c`` holds a carrier (−1 and empty slots: nothing). ``out``: (T, N), ``x``: (T, K),
    ``ids``: (T,) int32 slot per token on x's device. Returns ``out`` (updated in place)."""
    return plan.add_(out, x, ids)
