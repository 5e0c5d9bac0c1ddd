"""The in-memory carrier (SPEC §4): :class:`Carrier`, a whole model's carrier, made of one
:class:`CarrierModule` per projection plus the dense parts.

A Carrier is validated when it is built (:func:`~lcdd_kernels.carriers.validate.validate_carrier`)
and written by :meth:`Carrier.save`; the directory it writes is described in :mod:`.layout` and read
back by :func:`~lcdd_kernels.carriers.load.load_carrier`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.families import FAMILIES, GROUP_SOURCE, Dims, Family, sparsity_stats
from .layout import (
    CARRIER_TYPE,
    CONFIG_NAME,
    DENSE_SUFFIX,
    FORMAT_VERSION,
    SIGNATURE_NAME,
    SUFFIXES,
    THETA_NAME,
    WEIGHTS_NAME,
    projection_numel,
    summaries,
    tensor_sha256,
)
from .validate import validate_carrier


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

        from ..atomic import overwrite_guard, publish_dir

        d = Path(directory)
        conflict = overwrite_guard(d, (CONFIG_NAME, WEIGHTS_NAME, THETA_NAME), "carrier", overwrite)
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
