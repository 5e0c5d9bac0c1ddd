"""``apply_carrier``: a base model computes the LCDD model by adding the carrier (SPEC §4).

Plain PyTorch path: ``y = x·Bᵀ + b``, then ``y[..., rows] += x[..., cols]·Δᵀ``. The fast inference
kernels and many-carrier banks build on the same module swap (:class:`~lcdd_kernels.models.swap.ModuleSwaps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.families import plain_linear_paths
from ..ops.carrier import carrier_linear_ref
from ..models.swap import ModuleSwaps
from .format import Carrier, CarrierModule, check_compatible


class CarrierLinear(nn.Module):
    """A base projection plus one carrier. ``weight`` (N, K) and ``bias`` are the original linear's
    Parameters (shared, not copied); buffers ``rows`` (R,), ``cols`` (C,) int64 and ``delta`` (R, C).
    ``enabled = False`` gives the base projection alone (carrier off)."""

    def __init__(self, linear: nn.Linear, module: CarrierModule):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        dev = linear.weight.device
        self.register_buffer("rows", module.rows.to(dev, torch.long), persistent=False)
        self.register_buffer("cols", module.cols.to(dev, torch.long), persistent=False)
        self.register_buffer("delta", module.delta.to(dev, linear.weight.dtype), persistent=False)
        self.enabled = True

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"carrier={tuple(self.delta.shape)}, enabled={self.enabled}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.delta.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        return carrier_linear_ref(x, self.weight, self.delta.to(x.dtype), self.rows, self.cols, self.bias)


class CarrierHandle:
    """What :func:`apply_carrier` returns: ``enable(on)`` toggles the carrier, ``remove()`` restores
    the original projections (the base model exactly as before)."""

    def __init__(self, model: nn.Module, swaps: ModuleSwaps, carrier: Carrier):
        self.model, self.carrier, self._swaps = model, carrier, swaps

    def modules(self) -> dict[str, CarrierLinear]:
        return {p: self._swaps.current(p) for p in self._swaps.originals}

    def enable(self, on: bool = True) -> None:
        for m in self.modules().values():
            m.enabled = bool(on)

    def remove(self) -> nn.Module:
        return self._swaps.undo()


def apply_carrier(model: nn.Module, carrier: Carrier, allow_fingerprint_mismatch: bool = False) -> CarrierHandle:
    """Patch a base model (in place) so that every projection adds its carrier rows.

    Raises ValueError when the family or dimensions differ, and when the base weights' fingerprint
    differs from the one recorded in the carrier (unless ``allow_fingerprint_mismatch=True``).
    """
    paths = plain_linear_paths(model, "apply_carrier",
                               "remove the other patch (handle.remove()) before applying a carrier")
    check_compatible(model, carrier, allow_fingerprint_mismatch)
    swaps = ModuleSwaps(model)
    for _, _, path in paths:
        swaps.swap(path, CarrierLinear(model.get_submodule(path), carrier.modules[path]))
    return CarrierHandle(model, swaps, carrier)
