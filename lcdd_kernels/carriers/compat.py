"""Whether a carrier fits a model: its family, dimensions and base-weight fingerprint, and the
model's parameters that its dense parts replace."""

from __future__ import annotations

from torch import nn

from ..models.families import Dims, get_family
from .carrier import Carrier
from .extract import base_fingerprint


def check_compatible(model: nn.Module, carrier: Carrier, allow_fingerprint_mismatch: bool = False,
                     fingerprint: str | None = None) -> None:
    """Raise unless ``carrier`` was made for ``model``'s family, dimensions and base weights, and
    every dense part names a parameter of the model with the same shape.

    The base fingerprint must match too, unless ``allow_fingerprint_mismatch=True`` (e.g. a
    re-quantised copy of the same base). ``fingerprint``: the model's ``base_fingerprint``, when
    the caller already has it (it hashes every projection weight)."""
    fam = get_family(model)
    if fam.name != carrier.family:
        raise ValueError(f"the carrier is for a {carrier.family} model but this is a {fam.name} model")
    dims = Dims.from_config(model)
    if dims != carrier.dims:
        raise ValueError(f"the carrier is for dims {carrier.dims.to_dict()} but the model has {dims.to_dict()}")
    dense_targets(model, carrier, "the carrier")
    if allow_fingerprint_mismatch:
        return
    fp = fingerprint or base_fingerprint(model)
    if fp != carrier.base_fingerprint:
        raise ValueError(
            f"base model mismatch: the carrier was trained against base weights with fingerprint "
            f"{carrier.base_fingerprint} (name: {getattr(carrier, 'base_name', None)}) but this model's "
            f"projection weights have fingerprint {fp}; load the right base model, or pass "
            "allow_fingerprint_mismatch=True (CLI: --allow-fingerprint-mismatch) to apply it anyway")


def dense_targets(model: nn.Module, carrier, op: str) -> dict[str, nn.Parameter]:
    """The model's parameter for each of the carrier's dense parts (same shape), or a ValueError."""
    dense = getattr(carrier, "dense", None) or {}
    if not dense:
        return {}
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name, t in dense.items():
        p = params.get(name)
        if p is None:
            # a patched model (bank / carrier modules) names its projections' parameters the same way
            raise ValueError(f"{op}: its dense part {name!r} names a parameter this model does not have "
                             f"(e.g. it has {next(iter(params), None)!r}); is the carrier for another model?")
        if tuple(p.shape) != tuple(t.shape):
            raise ValueError(f"{op}: its dense part {name!r} has shape {tuple(t.shape)} but the model's parameter "
                             f"has {tuple(p.shape)}")
        out[name] = p
    return out
