"""``apply_carrier``: a base model computes the LCDD model by adding the carrier (SPEC §4).

``y = x·Bᵀ + b``, then ``y[..., rows] += x[..., cols]·Δᵀ`` through the registered op
``torch.ops.lcdd.bank_linear`` on a one-slot table built once per device and dtype (the C++ /
CUDA / Triton kernels by backend choice; nothing checked or built per call, no host sync), or the
plain PyTorch reference when the weights want gradients. Many-carrier banks build on the same
module swap (:class:`~lcdd_kernels.models.swap.ModuleSwaps`).
A carrier's dense parts (norm weights, biases, ...: the LCDD model's values) are copied into the
model's parameters in place; the base values they replace are kept (their size) and put back,
bit for bit, by ``enable(False)`` and ``remove()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.families import plain_linear_paths
from ..ops.carrier import CarrierTable, _select, carrier_linear, carrier_linear_ref, table_linear
from ..ops.masked_delta import _autocast
from ..models.swap import ModuleSwaps
from .carrier import Carrier, CarrierModule
from .compat import check_compatible, dense_targets


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
        self._table: CarrierTable | None = None
        self._table_for = None
        self._prepare_table(dev, linear.weight.dtype)

    def _prepare_table(self, device, dtype) -> CarrierTable:
        """The one-slot kernel table for activations on ``device`` in ``dtype`` (rows and cols were
        checked when the carrier was loaded)."""
        n = self.out_features
        entry = CarrierTable.entry(self.delta.to(device, dtype), self.rows.to(device), self.cols.to(device), n,
                                   slots=torch.device(device).type == "cuda")
        self._table = CarrierTable(n, self.in_features, [entry], torch.device(device))
        if self._table.views.device.type == "cuda":
            self._table.mark_static()
        self._table_for = (torch.device(device), dtype)
        return self._table

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"carrier={tuple(self.delta.shape)}, enabled={self.enabled}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.delta.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.weight, self.bias
        if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            # the kernels differentiate x only; the reference gives the weights their gradients
            return carrier_linear_ref(x, weight, self.delta.to(x.dtype), self.rows, self.cols, bias)
        x, weight, bias = _autocast(x, weight, bias)
        name = _select("carrier_linear", x, math.prod(x.shape[:-1]), None)
        if name == "reference":
            return carrier_linear_ref(x, weight, self.delta.to(x.dtype), self.rows, self.cols, bias)
        table = self._table
        if self._table_for != (x.device, x.dtype):
            if torch.compiler.is_compiling():  # building a table is eager work: the per-call op instead
                return carrier_linear(x, weight, self.delta.to(x.dtype), self.rows, self.cols, bias, backend=name)
            table = self._prepare_table(x.device, x.dtype)
        return table_linear(x, weight, bias, table, None, name, op="carrier_linear")


class CarrierHandle:
    """What :func:`apply_carrier` returns: ``enable(on)`` toggles the carrier (projections and
    dense parts), ``remove()`` restores the original projections and the base values of the dense
    parts (the base model exactly as before)."""

    def __init__(self, model: nn.Module, swaps: ModuleSwaps, carrier: Carrier,
                 dense: dict[str, tuple[nn.Parameter, torch.Tensor]] | None = None):
        self.model, self.carrier, self._swaps = model, carrier, swaps
        self._dense = dense or {}  # name -> (parameter, its base value)
        self._set_dense(True)

    def modules(self) -> dict[str, CarrierLinear]:
        return {p: self._swaps.current(p) for p in self._swaps.originals}

    @torch.no_grad()
    def _set_dense(self, on: bool) -> None:
        for name, (p, base) in self._dense.items():
            p.copy_(self.carrier.dense[name] if on else base)

    def enable(self, on: bool = True) -> None:
        for m in self.modules().values():
            m.enabled = bool(on)
        self._set_dense(bool(on))

    def remove(self) -> nn.Module:
        self._set_dense(False)
        self._dense = {}
        return self._swaps.undo()


def apply_carrier(model: nn.Module, carrier: Carrier, allow_fingerprint_mismatch: bool = False) -> CarrierHandle:
    """Patch a base model (in place) so that every projection adds its carrier rows.

    The carrier's dense parts (``carrier.dense``) are written into the model's parameters; the
    base values are kept and restored by ``handle.remove()`` / ``handle.enable(False)``.

    Raises ValueError when the family or dimensions differ, when a dense part names a parameter
    the model lacks or has another shape, and when the base weights' fingerprint differs from the
    one recorded in the carrier (unless ``allow_fingerprint_mismatch=True``).
    """
    paths = plain_linear_paths(model, "apply_carrier",
                               "remove the other patch (handle.remove()) before applying a carrier")
    check_compatible(model, carrier, allow_fingerprint_mismatch)
    dense = {name: (p, p.detach().clone()) for name, p in dense_targets(model, carrier, "apply_carrier").items()}
    swaps = ModuleSwaps(model)
    for _, _, path in paths:
        swaps.swap(path, CarrierLinear(model.get_submodule(path), carrier.modules[path]))
    return CarrierHandle(model, swaps, carrier, dense)
