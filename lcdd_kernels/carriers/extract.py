"""A carrier from a trained model, and the fingerprint of the base weights it was trained against
(SPEC §4)."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from ..models.families import expand_gqa, get_submodule, module_paths
from .carrier import Carrier, CarrierModule

#: Elements hashed per chunk by :func:`base_fingerprint` (bounds its extra memory to 16 MiB).
_HASH_CHUNK = 1 << 22


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``"sha256:<hex>"`` over each (name, shape, values as little-endian float32), streamed in
    chunks so that it never holds a second copy of a weight. float16/bfloat16/float32 copies of the
    same weights hash alike (the float32 upcast is exact)."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        h.update(f"{name}:{tuple(t.shape)};".encode())
        flat = t.reshape(-1)
        for chunk in flat.split(_HASH_CHUNK):
            h.update(chunk.to(device="cpu", dtype=torch.float32).contiguous().numpy().view("<u4"))
    return "sha256:" + h.hexdigest()


def base_fingerprint(model_or_handle) -> str:
    """Fingerprint of the base projection weights: of a base model (plain or carrier-applied), or
    of the frozen ``B`` inside an ``apply_lcdd`` handle or patched model."""
    from ..models.modules import MaskedDeltaLinear

    handle_modules = getattr(model_or_handle, "modules", None)
    if isinstance(handle_modules, dict):  # an LCDDHandle
        return fingerprint_tensors((path, m.base) for path, m in handle_modules.items())
    model = model_or_handle

    def weights():
        for _, _, path in module_paths(model):
            mod = get_submodule(model, path)
            yield path, mod.base if isinstance(mod, MaskedDeltaLinear) else mod.weight

    return fingerprint_tensors(weights())


def extract_carrier(handle, dtype: torch.dtype | None = None, include_theta: bool = True,
                    metadata: dict | None = None) -> Carrier:
    """The carrier of an ``apply_lcdd`` handle (SPEC §4): per projection, the rows and columns whose
    binary mask is on and ``Δ = (W − B)[rows][:, cols]``, computed in the weight's dtype (as the
    training op does) then cast to ``dtype`` if given; plus, as dense parts, the current values of
    the non-projection parameters that differ from the base (``handle.dense_parameters()``: empty
    in ``non_projection="base"`` mode; embeddings / lm_head only when they changed, with a warning)."""
    handle._live()
    channels = handle.active_channels()
    modules = {}
    weight_dtype = None
    for (layer, proj, path) in module_paths(handle.model):
        mod = handle.modules[path]
        rows = channels[layer][proj.rows]
        cols = channels[layer][proj.cols]
        if proj.gqa_cols:
            on = torch.zeros(handle.dims.num_kv_heads * handle.dims.head_dim, dtype=torch.bool)
            on[cols] = True
            cols = torch.nonzero(expand_gqa(on, handle.dims)).flatten()
        w, b = mod.weight.detach(), mod.base.detach()
        r, c = rows.to(w.device), cols.to(w.device)
        delta = w.index_select(0, r).index_select(1, c) - b.index_select(0, r).index_select(1, c)
        weight_dtype = w.dtype
        modules[path] = CarrierModule(rows.to(torch.int32), cols.to(torch.int32),
                                      delta.to(dtype or w.dtype).cpu())
    dense = {name: t.detach().to(dtype or weight_dtype).cpu().clone()
             for name, t in handle.dense_parameters().items()}
    return Carrier(modules, handle.family.name, handle.dims, dtype or weight_dtype, base_fingerprint(handle),
                   handle.base_name, handle.flat_theta() if include_theta else None, dict(metadata or {}), dense)
