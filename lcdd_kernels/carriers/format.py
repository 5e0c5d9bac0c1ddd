"""The carrier file format (SPEC §4): what LCDD leaves behind, small, safe and verifiable.

A carrier directory holds:

- ``carrier_config.json``: format version, ``carrier_type: "lcdd"``, model type and dimensions,
  dtype, target modules and their shapes, per-group and overall sparsity, parameter counts, the
  base model (fingerprint, name or path when known), the dense parts (``dense_parameters``: path ->
  shape and dtype) and a SHA-256 of every stored tensor's bytes (``tensor_sha256``, ``theta_sha256``);
- ``carrier.safetensors``: per projection ``<module>.carrier_rows`` and ``<module>.carrier_cols``
  (sorted, unique int32) and ``<module>.carrier_delta`` (|rows|×|cols|), where ``<module>`` is the
  projection's path in the Hugging Face model (``model.layers.0.self_attn.q_proj``); and per dense
  part ``<parameter>.carrier_dense``: the LCDD model's VALUE of a non-projection parameter that
  differs from the base (``model.layers.0.input_layernorm.weight``, ``...q_proj.bias``; embeddings
  and lm_head only when they changed), in the carrier dtype;
- optionally ``theta.safetensors`` (key ``theta``, the flat mask logits) to resume training.

Format version 2 added the dense parts and the hashes; version 1 files (no dense parts, no hashes)
still load. Nothing is unpickled; :func:`~lcdd_kernels.carriers.loading.load_carrier` validates
every field, key, dtype, shape, index and hash, cheap checks first and every size bounded by
what the tensors file holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..models.families import (
    FAMILIES,
    GROUP_SOURCE,
    Dims,
    Family,
    Projection,
    expand_gqa,
    get_submodule,
    module_paths,
    sparsity_stats,
)

FORMAT_VERSION = 2
#: Versions :func:`load_carrier` reads (1: no dense parts, no hashes).
READABLE_VERSIONS = (1, 2)
CARRIER_TYPE = "lcdd"
CONFIG_NAME = "carrier_config.json"
WEIGHTS_NAME = "carrier.safetensors"
THETA_NAME = "theta.safetensors"
SUFFIXES = ("carrier_rows", "carrier_cols", "carrier_delta")
DENSE_SUFFIX = "carrier_dense"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}

#: Elements hashed per chunk by :func:`base_fingerprint` (bounds its extra memory to 16 MiB).
_HASH_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------
# Base-model fingerprint
# ---------------------------------------------------------------------------------------------


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


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's raw bytes (row-major, as safetensors stores them)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


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


# ---------------------------------------------------------------------------------------------
# What follows from the family table and the dimensions (shared by save, validation and loading)
# ---------------------------------------------------------------------------------------------


def projection_paths(family: Family, num_layers: int) -> list[tuple[int, Projection, str]]:
    """Every projection a carrier holds as (layer, projection, full path), in layer order then
    table order: what :func:`~lcdd_kernels.models.families.module_paths` gives for a model."""
    return [(i, p, f"{family.layers}.{i}.{p.path}") for i in range(num_layers) for p in family.projections]


def projection_numel(family: Family, dims: Dims) -> int:
    """Entries of all the projection weights of a model of these dimensions."""
    return dims.num_layers * sum(math.prod(dims.shape(p)) for p in family.projections)


def summaries(stats: dict) -> tuple[dict, dict]:
    """The config's ``sparsity`` and ``active`` fields from :func:`sparsity_stats`."""
    return tuple({"overall": stats["overall"][k], "groups": {g: s[k] for g, s in stats["groups"].items()}}
                 for k in ("sparsity", "active"))


# ---------------------------------------------------------------------------------------------
# The in-memory carrier
# ---------------------------------------------------------------------------------------------


@dataclass
class CarrierModule:
    """One projection's carrier. rows: (R,) int32, cols: (C,) int32, both sorted and unique;
    delta: (R, C) = ``(W − B)[rows][:, cols]``."""

    rows: torch.Tensor
    cols: torch.Tensor
    delta: torch.Tensor

    @property
    def numel(self) -> int:
        return self.delta.numel()


@dataclass
class Carrier:
    """A whole model's carrier: ``modules`` maps each projection's path in the HF model to its
    :class:`CarrierModule`, in layer order then family-table order."""

    modules: dict[str, CarrierModule]
    family: str
    dims: Dims
    dtype: torch.dtype
    base_fingerprint: str
    base_name: str | None = None
    theta: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)
    #: full parameter path (as in the HF model's ``named_parameters()``) -> the LCDD model's value
    #: of a non-projection parameter that differs from the base (norm weights, projection biases;
    #: embeddings / lm_head only when they changed). Applying the carrier sets these values;
    #: removing it restores the base's.
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        from .loading import validate_carrier

        validate_carrier(self)

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    def layer_modules(self, layer: int) -> dict[str, CarrierModule]:
        """The projections of one decoder layer by their path inside the layer (``"mlp.up_proj"``)."""
        prefix = f"{self.family_spec.layers}.{layer}."
        return {p[len(prefix):]: m for p, m in self.modules.items() if p.startswith(prefix)}

    def active_channels(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, per mask group (SPEC §2 names): sorted int64 indices of active entries."""
        out = []
        for i in range(self.dims.num_layers):
            mods = self.layer_modules(i)
            out.append({g: getattr(mods[path], side).long() for g, (path, side) in GROUP_SOURCE.items()})
        return out

    def stats(self) -> dict:
        """Sparsity per layer and group, per group and overall (``families.sparsity_stats``)."""
        return sparsity_stats([{g: len(ix) for g, ix in layer.items()} for layer in self.active_channels()],
                              self.dims)

    def num_parameters(self) -> dict[str, int | float]:
        """Delta entries of the carrier against the projection weights of the model."""
        dense = projection_numel(self.family_spec, self.dims)
        carrier = sum(m.numel for m in self.modules.values())
        return {"carrier": carrier, "projections": dense, "ratio": carrier / dense if dense else 0.0,
                "dense": sum(t.numel() for t in self.dense.values())}

    def nbytes(self) -> dict[str, int]:
        """Bytes of the stored tensors: ``sparse`` (Δ, rows, cols), ``dense`` (dense parts), ``total``."""
        sparse = sum(t.numel() * t.element_size() for m in self.modules.values() for t in (m.rows, m.cols, m.delta))
        dense = sum(t.numel() * t.element_size() for t in self.dense.values())
        return {"sparse": sparse, "dense": dense, "total": sparse + dense}

    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``carrier.safetensors`` holds, by key (contiguous CPU tensors)."""
        out = {}
        for path, m in self.modules.items():
            for suffix, t in zip(SUFFIXES, (m.rows, m.cols, m.delta)):
                out[f"{path}.{suffix}"] = t.detach().cpu().contiguous()
        for path, t in self.dense.items():
            out[f"{path}.{DENSE_SUFFIX}"] = t.detach().cpu().contiguous()
        return out

    def config(self, tensors: dict[str, torch.Tensor] | None = None) -> dict:
        """The content of ``carrier_config.json`` (``tensors``: :meth:`tensors`, to hash)."""
        from .. import __version__

        tensors = self.tensors() if tensors is None else tensors

        sparsity, active = summaries(self.stats())
        fam = self.family_spec
        return {
            "format_version": FORMAT_VERSION,
            "carrier_type": CARRIER_TYPE,
            "model_type": self.family,
            "dims": self.dims.to_dict(),
            "dtype": str(self.dtype).replace("torch.", ""),
            "target_modules": [p.path for p in fam.projections],
            "module_shapes": {p.path: list(self.dims.shape(p)) for p in fam.projections},
            "sparsity": sparsity,
            "active": active,
            "num_parameters": self.num_parameters(),
            "base_model": {"name_or_path": self.base_name, "fingerprint": self.base_fingerprint},
            "theta_file": THETA_NAME if self.theta is not None else None,
            "dense_parameters": {p: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                                 for p, t in self.dense.items()},
            "tensor_sha256": {k: tensor_sha256(t) for k, t in tensors.items()},
            "theta_sha256": tensor_sha256(self._theta32()) if self.theta is not None else None,
            "lcdd_kernels_version": __version__,
            "metadata": self.metadata,
        }

    def _theta32(self) -> torch.Tensor:
        return self.theta.detach().float().cpu().contiguous()

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the carrier into ``directory`` (created if needed). Refuses to replace an existing
        carrier there unless ``overwrite=True``. The directory is published atomically and durably
        (:func:`lcdd_kernels.atomic.publish_dir`): a crash at any point leaves the whole old carrier
        or the whole new one; other files already in ``directory`` are kept, a signature of the old
        carrier is not."""
        from safetensors.torch import save_file

        from ..atomic import publish_dir
        from .signing import SIGNATURE_NAME

        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"{d} exists and is not a directory")

        def conflict(existing: Path) -> str | None:
            names = [n for n in (CONFIG_NAME, WEIGHTS_NAME, THETA_NAME) if (existing / n).exists()]
            if names and not overwrite:
                return (f"{d} already holds a carrier ({', '.join(names)}); choose another "
                        "directory or pass overwrite=True (CLI: --overwrite)")
            return None

        reason = conflict(d) if d.is_dir() else None
        if reason:
            raise FileExistsError(reason)
        tensors = self.tensors()
        config = json.dumps(self.config(tensors), indent=2)
        # the old writer's temporary names are owned too: a leftover of theirs is not carried over
        owned = {n for name in (CONFIG_NAME, WEIGHTS_NAME, THETA_NAME) for n in (name, f".{name}.tmp")}
        with publish_dir(d, conflict=conflict, owned=owned | {SIGNATURE_NAME}) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if self.theta is not None:
                save_file({"theta": self._theta32()}, str(tmp / THETA_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(config, encoding="utf-8")
        return d


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


def __getattr__(name: str):
    # load_carrier / check_compatible live in .loading (validation); importable from here as before
    if name in ("load_carrier", "check_compatible", "validate_carrier"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


