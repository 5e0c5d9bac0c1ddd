"""One carrier merged into a model's weights, and taken out again (SPEC §4).

:func:`merge_carrier_` adds one carrier into the base weights for zero overhead and keeps the
base entries it overwrote (|rows|×|cols| per projection, the carrier's size; the dense parts'
base values), so that :func:`unmerge_carrier_` restores the base weights bit for bit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .. import _checks
from .bank import BankLinear, _modules_of, _parts

__all__ = ["merge_carrier_", "unmerge_carrier_"]


@dataclass
class _Merge:
    carrier: object
    saved: dict[str, torch.Tensor]  # path -> the base entries W[rows][:, cols] before the merge
    fingerprint: str | None
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # name -> (parameter, value before)


#: model -> its merged carriers, oldest first (no attribute is added to the model)
_MERGED: "weakref.WeakKeyDictionary[nn.Module, list[_Merge]]" = weakref.WeakKeyDictionary()


def _merge_targets(model: nn.Module, carrier, op: str) -> list[tuple[str, torch.Tensor, object]]:
    out = []
    for path, m in _modules_of(carrier).items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{op}: the model has no module {path!r}; is the carrier for another model?") from None
        if not (type(mod) is nn.Linear or isinstance(mod, BankLinear)):
            raise ValueError(f"{op}: {path} is a {type(mod).__name__}; merge into plain nn.Linear projections "
                             "(a bank-served model is fine; undo other patches first)")
        delta, rows, cols = _parts(m)
        n, k = mod.weight.shape
        _checks.index_vector(f"{op}: {path}", "rows", rows, n, rows.device)
        _checks.index_vector(f"{op}: {path}", "cols", cols, k, cols.device)
        _checks.shape(f"{op}: {path}", "delta", delta, (rows.numel(), cols.numel()), "(|rows|, |cols|)")
        out.append((path, mod.weight, m))
    return out


@torch.no_grad()
def merge_carrier_(model: nn.Module, carrier, allow_fingerprint_mismatch: bool = False) -> nn.Module:
    """Add ``carrier`` into the model's projection weights in place (zero inference overhead).

    Each touched entry becomes ``B + Δ`` computed in at least fp32 and rounded once to the weight's
    dtype; each dense part's parameter takes the carrier's value (its base value is kept). The overwritten base entries are kept (the carrier's size) so that
    :func:`unmerge_carrier_` restores them bit for bit. Several carriers may be merged; unmerge
    them in reverse order. The first merge checks the carrier against the model (family,
    dimensions, base-weight fingerprint); later ones against that verified base.
    """
    from .compat import check_compatible

    op = "merge_carrier_"
    stack = _MERGED.get(model, [])
    if any(m.carrier is carrier for m in stack):
        raise ValueError(f"{op}: this carrier is already merged into the model")
    if hasattr(carrier, "base_fingerprint"):
        if not stack:
            check_compatible(model, carrier, allow_fingerprint_mismatch)
        else:
            check_compatible(model, carrier, allow_fingerprint_mismatch=True)
            base_fp = stack[0].fingerprint
            if not allow_fingerprint_mismatch and base_fp is not None and carrier.base_fingerprint != base_fp:
                raise ValueError(f"{op}: the carrier's base fingerprint {carrier.base_fingerprint} differs from "
                                 f"the base the merged carriers were checked against ({base_fp})")
    from .compat import dense_targets

    targets = _merge_targets(model, carrier, op)  # everything checked before anything changes
    dense = {name: (p, p.detach().clone()) for name, p in dense_targets(model, carrier, op).items()}
    for name, (p, _) in dense.items():
        p.data.copy_(carrier.dense[name])
    saved = {}
    for path, w, m in targets:
        delta, rows, cols = _parts(m)
        r = rows.to(w.device, torch.long)[:, None]
        c = cols.to(w.device, torch.long)[None, :]
        old = w[r, c]
        acc = torch.promote_types(w.dtype, torch.float32)
        w[r, c] = (old.to(acc) + delta.to(w.device, acc)).to(w.dtype)
        saved[path] = old
    fp = stack[0].fingerprint if stack else getattr(carrier, "base_fingerprint", None)
    _MERGED[model] = stack + [_Merge(carrier, saved, fp, dense)]
    return model


@torch.no_grad()
def unmerge_carrier_(model: nn.Module, carrier) -> nn.Module:
    """Undo :func:`merge_carrier_`: the entries it changed get their saved base values back, bit
    for bit. Carriers merged later must be unmerged first."""
    op = "unmerge_carrier_"
    stack = _MERGED.get(model, [])
    pos = next((i for i, m in enumerate(stack) if m.carrier is carrier), None)
    if pos is None:
        raise ValueError(f"{op}: this carrier is not merged into the model (merge_carrier_ it first)")
    if pos != len(stack) - 1:
        raise ValueError(f"{op}: {len(stack) - 1 - pos} carrier(s) were merged after this one and touch the "
                         "same weights; unmerge them first (reverse order of merging)")
    merge = stack.pop()
    for path, m in _modules_of(carrier).items():
        delta, rows, cols = _parts(m)
        w = model.get_submodule(path).weight
        w[rows.to(w.device, torch.long)[:, None], cols.to(w.device, torch.long)[None, :]] = merge.saved[path]
    for p, before in (merge.dense or {}).values():
        p.data.copy_(before)
    if not stack:
        del _MERGED[model]
    return model
