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
still load. Nothing is unpickled; :func:`~lcdd_kernels.carriers.load.load_carrier` validates
every field, key, dtype, shape, index and hash, cheap checks first and every size bounded by
what the tensors file holds (:mod:`.files`).

This module holds the format's names and what follows from the family table and the dimensions;
:meth:`Carrier.save <lcdd_kernels.carriers.carrier.Carrier.save>` writes a directory and
:mod:`.files` reads one.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..models.families import Dims, Family, Projection

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
#: The signature file inside a carrier directory (a Sigstore bundle, JSON), written by
#: :func:`~lcdd_kernels.carriers.signing.sign_carrier` and left out of what is signed.
SIGNATURE_NAME = "carrier.sig"


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's raw bytes (row-major, as safetensors stores them)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


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
