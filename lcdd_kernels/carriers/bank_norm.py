"""Norm weights per sequence in a bank-served model (:func:`~lcdd_kernels.apply_carrier_bank`).

A carrier's dense parts include the LCDD model's RMSNorm weights. :class:`BankNorm` replaces each
RMSNorm so that every token is scaled by its own carrier's weight, read from the bank's small
per-parameter table (``bank.dense_rows``, built when the bank changes): a gather, no host sync, no copy of the model per
carrier.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class BankNorm(nn.Module):
    """An RMSNorm served with a carrier bank: each token's norm weight is its carrier's (dense
    part) or the model's. ``weight`` is the original norm's Parameter (shared, not copied). The
    normalisation is the original module's own code run with a unit weight, then scaled by the
    gathered weights: ``w · n(x)`` exactly as the original computes it for that weight."""

    def __init__(self, norm: nn.Module, bank, path: str):
        super().__init__()
        self.weight = norm.weight
        self.bank, self.path = bank, path
        unit = copy.deepcopy(norm).requires_grad_(False)
        with torch.no_grad():
            unit.weight.fill_(1)
        self.__dict__["inner"] = norm  # not registered: the model's module, put back by restore()
        self.__dict__["unit"] = unit

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, carriers={self.bank.ids}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.bank.token_ids(x) if self.bank.has_dense(f"{self.path}.weight") else None
        if ids is None:
            return self.inner(x)
        unit = self.unit
        if unit.weight.device != x.device:
            unit.to(x.device)
        w = self.bank.dense_rows(f"{self.path}.weight", self.weight, ids)
        h = unit(x)
        return h * w.view(h.shape).to(torch.promote_types(w.dtype, h.dtype))


def norm_paths(model: nn.Module) -> dict[str, nn.Module]:
    """The model's RMSNorm modules whose output is ``weight · n(x)`` (checked on one input), by path."""
    out = {}
    for path, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not type(mod).__name__.endswith("RMSNorm") or not isinstance(w, torch.Tensor) or w.dim() != 1:
            continue
        unit = copy.deepcopy(mod).requires_grad_(False)
        with torch.no_grad():
            unit.weight.fill_(1)
            x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
            if not torch.equal(mod(x), unit(x) * w):
                continue  # another form (e.g. (1 + w)·n(x)): not routed; a carrier with it is refused
        out[path] = mod
    return out
