"""The carrier file format (SPEC §4): what LCDD leaves behind, small, safe and verifiable.

A carrier directory holds:

- ``carrier_config.json``: format version, ``carrier_type: "lcdd"``, model type and dimensions,
  dtype, target modules and their shapes, per-group and overall sparsity, parameter counts, and the
  base model (fingerprint, name or path when known);
- ``carrier.safetensors``: per projection ``<module>.carrier_rows`` and ``<module>.carrier_cols``
  (sorted, unique int32) and ``<module>.carrier_delta`` (|rows|×|cols|), where ``<module>`` is the
  projection's path in the Hugging Face model (``model.layers.0.self_attn.q_proj``);
- optionally ``theta.safetensors`` (key ``theta``, the flat mask logits) to resume training.

Nothing is unpickled; :func:`load_carrier` validates every field, key, dtype, shape and index and
that the config and tensors belong together.
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
from torch import nn

from .. import _checks
from ..models.families import (
    FAMILIES,
    GROUP_SOURCE,
    GROUPS,
    Dims,
    Family,
    expand_gqa,
    family_of_model_type,
    get_family,
    get_submodule,
    module_paths,
    sparsity_stats,
)

FORMAT_VERSION = 1
CARRIER_TYPE = "lcdd"
CONFIG_NAME = "carrier_config.json"
WEIGHTS_NAME = "carrier.safetensors"
THETA_NAME = "theta.safetensors"
SUFFIXES = ("carrier_rows", "carrier_cols", "carrier_delta")
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
# The in-memory carrier
# ---------------------------------------------------------------------------------------------


@dataclass
class CarrierModule:
    """One projection's carrier. rows: (R,) int32, cols: (C,) int32, both sorted and unique;
    delta: (R, C) = (W − B)[rows][:, cols]."""

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

    def __post_init__(self):
        _validate(self)

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
        fam = self.family_spec
        dense = self.dims.num_layers * sum(math.prod(self.dims.shape(p)) for p in fam.projections)
        carrier = sum(m.numel for m in self.modules.values())
        return {"carrier": carrier, "projections": dense, "ratio": carrier / dense if dense else 0.0}

    def config(self) -> dict:
        """The content of ``carrier_config.json``."""
        from .. import __version__

        stats = self.stats()
        fam = self.family_spec
        return {
            "format_version": FORMAT_VERSION,
            "carrier_type": CARRIER_TYPE,
            "model_type": self.family,
            "dims": self.dims.to_dict(),
            "dtype": str(self.dtype).replace("torch.", ""),
            "target_modules": [p.path for p in fam.projections],
            "module_shapes": {p.path: list(self.dims.shape(p)) for p in fam.projections},
            "sparsity": {"overall": stats["overall"]["sparsity"],
                         "groups": {g: s["sparsity"] for g, s in stats["groups"].items()}},
            "active": {"overall": stats["overall"]["active"],
                       "groups": {g: s["active"] for g, s in stats["groups"].items()}},
            "num_parameters": self.num_parameters(),
            "base_model": {"name_or_path": self.base_name, "fingerprint": self.base_fingerprint},
            "theta_file": THETA_NAME if self.theta is not None else None,
            "lcdd_kernels_version": __version__,
            "metadata": self.metadata,
        }

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the carrier into ``directory`` (created if needed). Refuses to replace an existing
        carrier there unless ``overwrite=True``; files are written whole, then renamed into place."""
        from safetensors.torch import save_file

        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise FileExistsError(f"{d} exists and is not a directory")
        existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, THETA_NAME) if (d / n).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{d} already holds a carrier ({', '.join(existing)}); choose another "
                                  "directory or pass overwrite=True (CLI: --overwrite)")
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for path, m in self.modules.items():
            for suffix, t in zip(SUFFIXES, (m.rows, m.cols, m.delta)):
                tensors[f"{path}.{suffix}"] = t.detach().cpu().contiguous()
        writes = [(WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))]
        if self.theta is not None:
            theta = {"theta": self.theta.detach().float().cpu().contiguous()}
            writes.append((THETA_NAME, lambda p: save_file(theta, p, metadata={"format": "pt"})))
        elif (d / THETA_NAME).exists():
            (d / THETA_NAME).unlink()  # overwrite=True: a stale θ must not pass for this carrier's
        config = json.dumps(self.config(), indent=2)
        writes.append((CONFIG_NAME, lambda p: Path(p).write_text(config, encoding="utf-8")))
        for name, write in writes:  # config last: a directory with a config is a complete carrier
            tmp = d / f".{name}.tmp"
            write(str(tmp))
            os.replace(tmp, d / name)
        return d


def extract_carrier(handle, dtype: torch.dtype | None = None, include_theta: bool = True,
                    metadata: dict | None = None) -> Carrier:
    """The carrier of an ``apply_lcdd`` handle (SPEC §4): per projection, the rows and columns whose
    binary mask is on and ``Δ = (W − B)[rows][:, cols]``, computed in the weight's dtype (as the
    training op does) then cast to ``dtype`` if given."""
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
    return Carrier(modules, handle.family.name, handle.dims, dtype or weight_dtype, base_fingerprint(handle),
                   handle.base_name, handle.flat_theta() if include_theta else None, dict(metadata or {}))


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _validate(c: Carrier, where: str = "carrier") -> None:
    """Every structural property a carrier must have; raises ValueError naming the first problem."""
    if c.family not in FAMILIES:
        _fail(where, f"model_type {c.family!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    if c.dtype not in DTYPES.values():
        _fail(where, f"dtype {c.dtype} is not one of {', '.join(DTYPES)}")
    if not isinstance(c.base_fingerprint, str) or not c.base_fingerprint.startswith("sha256:"):
        _fail(where, f"base fingerprint {c.base_fingerprint!r} is not of the form 'sha256:<hex>'")
    paths = module_paths(_FakeConfig(c.family, c.dims))
    expected = [p for _, _, p in paths]
    missing = [p for p in expected if p not in c.modules]
    extra = [p for p in c.modules if p not in set(expected)]
    if missing or extra:
        _fail(where, f"modules do not match a {c.family} model of {c.dims.num_layers} layers: missing {missing[:3]}"
                     f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for layer, proj, path in paths:
        m = c.modules[path]
        n, k = c.dims.shape(proj)
        op = f"{where}: {path}"
        _checks.index_vector(op, "carrier_rows", m.rows, n, m.rows.device)
        _checks.index_vector(op, "carrier_cols", m.cols, k, m.cols.device)
        if m.rows.dtype != torch.int32 or m.cols.dtype != torch.int32:
            _fail(op, f"rows/cols must be int32, got {m.rows.dtype} / {m.cols.dtype}")
        _checks.tensor(op, "carrier_delta", m.delta)
        if m.delta.dtype != c.dtype:
            _fail(op, f"carrier_delta has dtype {m.delta.dtype} but the carrier's dtype is {c.dtype}")
        if tuple(m.delta.shape) != (m.rows.numel(), m.cols.numel()):
            _fail(op, f"carrier_delta has shape {tuple(m.delta.shape)}, expected (|rows|, |cols|) = "
                      f"({m.rows.numel()}, {m.cols.numel()})")
        if not bool(torch.isfinite(m.delta).all()):
            _fail(op, "carrier_delta holds NaN or inf")
    _check_shared_masks(c, where)
    if c.theta is not None:
        if c.theta.dim() != 1 or c.theta.numel() != c.dims.num_masks:
            _fail(where, f"theta has shape {tuple(c.theta.shape)}, expected ({c.dims.num_masks},)")
        sizes = c.dims.group_sizes()
        binary = torch.cat([_onehot(layer[g], sizes[g]) for layer in c.active_channels() for g in GROUPS])
        if not torch.equal(binary, c.theta.detach().cpu() > 0):
            _fail(where, "theta's active entries (θ > 0) differ from the carrier's rows and columns; "
                         "theta belongs to another carrier")


def _onehot(ix: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[ix.long().cpu()] = True
    return out


def _check_shared_masks(c: Carrier, where: str) -> None:
    """Projections that share a mask group (SPEC §2) must agree on its indices."""
    for layer in range(c.dims.num_layers):
        mods = c.layer_modules(layer)
        for proj in c.family_spec.projections:
            for side, group in (("rows", proj.rows), ("cols", proj.cols)):
                path, src_side = GROUP_SOURCE[group]
                want = getattr(mods[path], src_side)
                if side == "cols" and proj.gqa_cols:
                    want = torch.nonzero(expand_gqa(_onehot(want, c.dims.num_kv_heads * c.dims.head_dim),
                                                    c.dims)).flatten().to(torch.int32)
                got = getattr(mods[proj.path], side)
                if not torch.equal(got.cpu(), want.cpu()):
                    _fail(f"{where}: {c.family_spec.layers}.{layer}.{proj.path}",
                          f"its {side} disagree with the {group!r} mask used by {path}; "
                          "the carrier is inconsistent (edited or assembled from different carriers)")


class _FakeConfig:
    """Just enough of a transformers config for the family helpers (model_type and dims)."""

    def __init__(self, family: str, dims: Dims):
        fam = FAMILIES[family]
        self.model_type = fam.model_types[0]
        for attr, value in ((fam.num_layers, dims.num_layers), (fam.hidden_size, dims.hidden_size),
                            (fam.intermediate_size, dims.intermediate_size), (fam.num_heads, dims.num_heads),
                            (fam.num_kv_heads, dims.num_kv_heads), (fam.head_dim, dims.head_dim)):
            setattr(self, attr, value)


_REQUIRED = {"format_version": int, "carrier_type": str, "model_type": str, "dims": dict, "dtype": str,
             "target_modules": list, "module_shapes": dict, "sparsity": dict, "active": dict,
             "num_parameters": dict, "base_model": dict}


def _read_config(d: Path) -> dict:
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{d} holds no {CONFIG_NAME}: not a carrier directory (save one with Carrier.save)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not valid JSON: {e})") from None
    if not isinstance(cfg, dict):
        _fail(str(path), "must hold a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in cfg:
            _fail(str(path), f"missing field {key!r}")
        if not isinstance(cfg[key], typ) or (typ is int and isinstance(cfg[key], bool)):
            _fail(str(path), f"field {key!r} must be a {typ.__name__}, got {type(cfg[key]).__name__}")
    if cfg["format_version"] > FORMAT_VERSION:
        _fail(str(path), f"format_version {cfg['format_version']} was written by a newer lcdd-kernels "
                         f"(this one reads up to {FORMAT_VERSION}); upgrade lcdd-kernels")
    if cfg["format_version"] < 1:
        _fail(str(path), f"format_version {cfg['format_version']} is invalid")
    if cfg["carrier_type"] != CARRIER_TYPE:
        _fail(str(path), f"carrier_type is {cfg['carrier_type']!r}, expected {CARRIER_TYPE!r}")
    fam = family_of_model_type(cfg["model_type"])
    fields = set(Dims.__dataclass_fields__)
    dims = cfg["dims"]
    if set(dims) != fields or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                      for v in dims.values()):
        _fail(str(path), f"dims must hold positive integers {sorted(fields)}, got {dims}")
    dims = Dims(**dims)
    if dims.num_heads % dims.num_kv_heads:
        _fail(str(path), f"dims: num_heads {dims.num_heads} is not a multiple of num_kv_heads {dims.num_kv_heads}")
    if cfg["dtype"] not in DTYPES:
        _fail(str(path), f"dtype {cfg['dtype']!r} is not one of {', '.join(DTYPES)}")
    targets = [p.path for p in fam.projections]
    if cfg["target_modules"] != targets:
        _fail(str(path), f"target_modules {cfg['target_modules']} differ from the {fam.name} projections {targets}")
    shapes = {p.path: list(dims.shape(p)) for p in fam.projections}
    if cfg["module_shapes"] != shapes:
        _fail(str(path), f"module_shapes {cfg['module_shapes']} do not follow from dims (expected {shapes})")
    fp = cfg["base_model"].get("fingerprint")
    name = cfg["base_model"].get("name_or_path")
    if not isinstance(fp, str) or not isinstance(name, (str, type(None))):
        _fail(str(path), "base_model needs a string 'fingerprint' and a string or null 'name_or_path'")
    if cfg.get("theta_file") not in (None, THETA_NAME):
        _fail(str(path), f"theta_file must be null or {THETA_NAME!r}, got {cfg.get('theta_file')!r}")
    cfg["_family"], cfg["_dims"] = fam, dims
    return cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a carrier directory needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files; name the file
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                         "save or copy the carrier again") from None


def load_carrier(directory: str | os.PathLike, device: torch.device | str = "cpu") -> Carrier:
    """Read and validate a carrier directory written by :meth:`Carrier.save`.

    Every config field, tensor key, dtype, shape and index is checked, and the config's counts must
    agree with the tensors; a damaged or mismatched file raises a ValueError naming it.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"carrier directory {d} does not exist")
    cfg = _read_config(d)
    fam, dims = cfg["_family"], cfg["_dims"]
    tensors = _read_safetensors(d / WEIGHTS_NAME)
    paths = [p for _, _, p in module_paths(_FakeConfig(fam.name, dims))]
    expected = {f"{p}.{s}" for p in paths for s in SUFFIXES}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        _fail(str(d / WEIGHTS_NAME), f"keys do not match carrier_config.json: missing {missing[:3]}"
                                     f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected "
                                     f"{extra[:3]}{'...' if len(extra) > 3 else ''} ({len(extra)})")
    modules = {p: CarrierModule(*(tensors[f"{p}.{s}"].to(device) for s in SUFFIXES)) for p in paths}
    theta = None
    if cfg.get("theta_file"):
        t = _read_safetensors(d / THETA_NAME)
        if set(t) != {"theta"}:
            _fail(str(d / THETA_NAME), f"must hold exactly the key 'theta', got {sorted(t)}")
        theta = t["theta"]
    carrier = Carrier(modules, fam.name, dims, DTYPES[cfg["dtype"]], cfg["base_model"]["fingerprint"],
                      cfg["base_model"].get("name_or_path"), theta, dict(cfg.get("metadata") or {}))
    stats = carrier.stats()
    recorded = cfg["active"]
    actual = {"overall": stats["overall"]["active"], "groups": {g: s["active"] for g, s in stats["groups"].items()}}
    if recorded != actual:
        _fail(str(d), f"carrier_config.json records {recorded} active entries but {WEIGHTS_NAME} holds "
                      f"{actual}; the two files come from different carriers")
    return carrier


def check_compatible(model: nn.Module, carrier: Carrier, allow_fingerprint_mismatch: bool = False,
                     fingerprint: str | None = None) -> None:
    """Raise unless ``carrier`` was made for ``model``'s family, dimensions and base weights.

    Family and dimensions must match. The base fingerprint must match too, unless
    ``allow_fingerprint_mismatch=True`` (e.g. a re-quantised copy of the same base).
    ``fingerprint``: the model's ``base_fingerprint``, when the caller already has it (it hashes
    every projection weight)."""
    fam = get_family(model)
    if fam.name != carrier.family:
        raise ValueError(f"the carrier is for a {carrier.family} model but this is a {fam.name} model")
    dims = Dims.from_config(model)
    if dims != carrier.dims:
        raise ValueError(f"the carrier is for dims {carrier.dims.to_dict()} but the model has {dims.to_dict()}")
    if allow_fingerprint_mismatch:
        return
    fp = fingerprint or base_fingerprint(model)
    if fp != carrier.base_fingerprint:
        raise ValueError(
            f"base model mismatch: the carrier was trained against base weights with fingerprint "
            f"{carrier.base_fingerprint} (name: {getattr(carrier, 'base_name', None)}) but this model's "
            f"projection weights have fingerprint {fp}; load the right base model, or pass "
            "allow_fingerprint_mismatch=True (CLI: --allow-fingerprint-mismatch) to apply it anyway")
