"""Reading carrier directories (the format is described in :mod:`.layout`; :func:`read_carrier`
is what :func:`~lcdd_kernels.carriers.load.load_carrier` runs, after a signature check when asked).

A carrier directory is untrusted input. :func:`read_carrier` reads it in an order that keeps a
damaged or hostile file from costing more than the file itself:

1. ``carrier_config.json`` (at most :data:`CONFIG_LIMIT` bytes): every field's type and range;
   JSON nested too deep or numbers too long are refused naming the file;
2. the safetensors *header* of ``carrier.safetensors`` (and ``theta.safetensors``): keys, dtypes,
   shapes and byte ranges, and their consistency with the config (layer count, shapes, shared
   mask sizes, active counts, parameter counts) -- all before a tensor is read or a per-layer list
   is built, so every size is bounded by what the tensors file holds;
3. the tensors: indices sorted, unique and in range; every Δ, dense part and θ finite; projections
   sharing a mask agree; θ's active entries match the rows and columns;
4. the SHA-256 of every tensor against ``tensor_sha256`` / ``theta_sha256`` (format 2).

Every refusal is a ValueError (FileNotFoundError for missing files) naming the file and the
tensor or field. Version-1 files (no dense parts, no hashes) load with one warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

import torch

from ..models.families import GROUP_SOURCE, GROUPS, Dims, family_of_model_type, sparsity_stats
from .carrier import Carrier, CarrierModule
from .layout import (
    CARRIER_TYPE,
    CONFIG_NAME,
    DENSE_SUFFIX,
    DTYPES,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    SUFFIXES,
    THETA_NAME,
    WEIGHTS_NAME,
    projection_numel,
    projection_paths,
    summaries,
    tensor_sha256,
)
from .validate import _WHERE, _fail

log = logging.getLogger("lcdd_kernels.carriers")

#: Largest ``carrier_config.json`` read (a real one is kilobytes; an 80-layer model's ~0.3 MB).
CONFIG_LIMIT = 64 << 20
#: Largest safetensors header read (the safetensors library's own limit).
HEADER_LIMIT = 100_000_000
#: Largest model dimension accepted (indices are int32).
DIM_LIMIT = 2**31 - 1

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9A-Za-z.+!_-]{1,64}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) < 2**53 if isinstance(v, int) else math.isfinite(v)  # float(10**400) would raise


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def _parse_json(raw: bytes | str, where) -> object:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is corrupt (not valid JSON: {e})") from None
    except RecursionError:
        raise ValueError(f"{where} is corrupt (JSON nested too deeply for a carrier file)") from None
    except ValueError as e:  # e.g. Python's limit on the digits of an integer literal
        raise ValueError(f"{where} is corrupt (a value in it is out of range: {e})") from None


def _read_json_file(path: Path, limit: int = CONFIG_LIMIT) -> object:
    size = path.stat().st_size
    if size > limit:
        _fail(path, f"is {size:,} bytes; a carrier config is at most {limit:,} (is it the right file?)")
    return _parse_json(path.read_bytes(), path)


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors a safetensors file declares, {key: (dtype, shape)}, from its header alone
    (bounded by :data:`HEADER_LIMIT`); byte ranges are checked against the file's size."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a carrier directory needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    size = path.stat().st_size

    def bad(detail: str):
        raise ValueError(f"{path} is corrupt or truncated ({detail}); save or copy the carrier again")

    if size < 8:
        bad(f"{size} bytes, shorter than a safetensors header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > HEADER_LIMIT:
            bad(f"the header claims {n:,} bytes but the file has {size:,}")
        raw = f.read(n)
    try:
        header = _parse_json(raw, "header")
    except ValueError as e:
        bad(str(e))
    if not isinstance(header, dict):
        bad("the header is not a JSON object")
    data_len = size - 8 - n
    out, spans = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                bad("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            bad(f"entry {key!r} is not a tensor description")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            bad(f"tensor {key!r} has dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s) and s >= 0 for s in shape):
            bad(f"tensor {key!r} has shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            bad(f"tensor {key!r} has byte range {offs!r} outside the file's {data_len:,} data bytes")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if offs[1] - offs[0] != nbytes:
            bad(f"tensor {key!r} of shape {shape} {dtype} needs {nbytes:,} bytes but its range holds "
                f"{offs[1] - offs[0]:,}")
        spans.append((offs[0], offs[1], key))
        out[key] = (_ST_DTYPES[dtype], tuple(shape))
    spans.sort()
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            bad(f"tensors {k0!r} and {k1!r} overlap")
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files; name the file
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                         "save or copy the carrier again") from None


_REQUIRED = {"format_version": int, "carrier_type": str, "model_type": str, "dims": dict, "dtype": str,
             "target_modules": list, "module_shapes": dict, "sparsity": dict, "active": dict,
             "num_parameters": dict, "base_model": dict}
_REQUIRED_V2 = {"dense_parameters": dict, "tensor_sha256": dict}


def read_config(d: Path) -> dict:
    """``carrier_config.json`` parsed and checked field by field (types, ranges, and what follows
    from the dimensions); adds ``_family`` and ``_dims``."""
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{d} holds no {CONFIG_NAME}: not a carrier directory (save one with Carrier.save)")
    cfg = _read_json_file(path)
    if not isinstance(cfg, dict):
        _fail(path, "must hold a JSON object")
    version = cfg.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        _fail(path, f"format_version {version} was written by a newer lcdd-kernels "
                    f"(this one reads up to {FORMAT_VERSION}); upgrade lcdd-kernels")
    required = dict(_REQUIRED, **(_REQUIRED_V2 if _is_int(version) and version >= 2 else {}))
    for key, typ in required.items():
        if key not in cfg:
            _fail(path, f"missing field {key!r}")
        if not isinstance(cfg[key], typ) or (typ is int and isinstance(cfg[key], bool)):
            _fail(path, f"field {key!r} must be a {typ.__name__}, got {type(cfg[key]).__name__}")
    if version not in READABLE_VERSIONS:
        _fail(path, f"format_version {version} is invalid (this lcdd-kernels reads {READABLE_VERSIONS})")
    if cfg["carrier_type"] != CARRIER_TYPE:
        _fail(path, f"carrier_type is {cfg['carrier_type']!r}, expected {CARRIER_TYPE!r}")
    try:
        fam = family_of_model_type(cfg["model_type"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    fields = set(Dims.__dataclass_fields__)
    dims = cfg["dims"]
    if set(dims) != fields or not all(_is_int(v) and 0 < v <= DIM_LIMIT for v in dims.values()):
        _fail(path, f"dims must hold positive integers (at most {DIM_LIMIT}) {sorted(fields)}, got "
                    f"{json.dumps(dims)[:300]}")
    dims = Dims(**dims)
    if dims.num_heads % dims.num_kv_heads:
        _fail(path, f"dims: num_heads {dims.num_heads} is not a multiple of num_kv_heads {dims.num_kv_heads}")
    if cfg["dtype"] not in DTYPES:
        _fail(path, f"dtype {str(cfg['dtype'])[:40]!r} is not one of {', '.join(DTYPES)}")
    targets = [p.path for p in fam.projections]
    if cfg["target_modules"] != targets:
        _fail(path, f"target_modules {str(cfg['target_modules'])[:300]} differ from the {fam.name} projections {targets}")
    shapes = {p.path: list(dims.shape(p)) for p in fam.projections}
    if cfg["module_shapes"] != shapes:
        _fail(path, f"module_shapes {str(cfg['module_shapes'])[:300]} do not follow from dims (expected {shapes})")
    fp = cfg["base_model"].get("fingerprint")
    name = cfg["base_model"].get("name_or_path")
    if not isinstance(fp, str) or not isinstance(name, (str, type(None))):
        _fail(path, "base_model needs a string 'fingerprint' and a string or null 'name_or_path'")
    if not (fp.startswith("sha256:") and _HEX64.fullmatch(fp[7:])):
        _fail(path, f"base_model.fingerprint {fp[:80]!r} is not 'sha256:' and 64 hex digits")
    if cfg.get("theta_file") not in (None, THETA_NAME):
        _fail(path, f"theta_file must be null or {THETA_NAME!r}, got {str(cfg.get('theta_file'))[:80]!r}")
    meta = cfg.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        _fail(path, f"field 'metadata' must be a JSON object or null, got {type(meta).__name__}")
    ver = cfg.get("lcdd_kernels_version")
    if ver is not None and not (isinstance(ver, str) and _VERSION.fullmatch(ver)):
        _fail(path, f"field 'lcdd_kernels_version' must be a version string like '0.1.0', got {str(ver)[:80]!r}")
    _check_summaries(cfg, path)
    if version >= 2:
        for p, info in cfg["dense_parameters"].items():
            if not (isinstance(info, dict) and set(info) == {"shape", "dtype"} and isinstance(info["shape"], list)
                    and len(info["shape"]) in (1, 2) and all(_is_int(s) and s > 0 for s in info["shape"])
                    and info["dtype"] == cfg["dtype"]):
                _fail(path, f"dense_parameters[{p[:200]!r}] must be {{'shape': [1 or 2 positive ints], 'dtype': "
                            f"{cfg['dtype']!r}}}, got {str(info)[:200]}")
        for k, h in cfg["tensor_sha256"].items():
            if not (isinstance(h, str) and _HEX64.fullmatch(h)):
                _fail(path, f"tensor_sha256[{k[:200]!r}] must be 64 hex digits, got {str(h)[:80]!r}")
        th = cfg.get("theta_sha256")
        if (th is None) != (cfg.get("theta_file") is None) or (th is not None and not (isinstance(th, str)
                                                                                       and _HEX64.fullmatch(th))):
            _fail(path, "theta_sha256 must be 64 hex digits when theta_file is set, null otherwise")
    cfg["_family"], cfg["_dims"] = fam, dims
    return cfg


def _check_summaries(cfg: dict, path: Path) -> None:
    """Types and ranges of the recorded statistics (their values are compared with the tensors later)."""
    sp, act, num = cfg["sparsity"], cfg["active"], cfg["num_parameters"]
    if (set(sp) != {"overall", "groups"} or not _is_num(sp["overall"]) or not isinstance(sp["groups"], dict)
            or set(sp["groups"]) != set(GROUPS) or not all(_is_num(v) for v in sp["groups"].values())
            or not all(0 <= v <= 1 for v in [sp["overall"], *sp["groups"].values()])):
        _fail(path, f"sparsity must be {{'overall': x, 'groups': {{group: x}}}} with x in [0, 1] for the groups "
                    f"{list(GROUPS)}, got {str(sp)[:200]}")
    if (set(act) != {"overall", "groups"} or not _is_int(act["overall"]) or not isinstance(act["groups"], dict)
            or set(act["groups"]) != set(GROUPS) or not all(_is_int(v) and v >= 0 for v in act["groups"].values())):
        _fail(path, f"active must be {{'overall': n, 'groups': {{group: n}}}} with counts, got {str(act)[:200]}")
    want = {"carrier", "projections", "ratio"} | ({"dense"} if cfg["format_version"] >= 2 else set())
    if (set(num) != want or not all(_is_int(num[k]) and num[k] >= 0 for k in want - {"ratio"})
            or not _is_num(num["ratio"])):
        _fail(path, f"num_parameters must hold the counts {sorted(want)} (ratio a number), got {str(num)[:200]}")


def _layer_of(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix):
        return None
    head = key[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) <= 9 else None


def _check_header(cfg: dict, header: dict, d: Path) -> list[tuple[int, object, str]]:
    """The config against the tensors file's header, before any tensor is read: keys, dtypes,
    shapes, shared-mask sizes, active and parameter counts. Returns the projection paths."""
    fam, dims = cfg["_family"], cfg["_dims"]
    wpath = d / WEIGHTS_NAME
    dense = cfg.get("dense_parameters", {})
    layers_held = max((layer for k in header if (layer := _layer_of(k, fam.layers + ".")) is not None), default=-1) + 1
    if dims.num_layers > layers_held:
        _fail(wpath, f"carrier_config.json says {dims.num_layers} layers but this file holds tensors of "
                     f"{layers_held}; the two files do not belong together")
    paths = projection_paths(fam, dims.num_layers)
    expected = {f"{path}.{s}" for _, _, path in paths for s in SUFFIXES} | {f"{p}.{DENSE_SUFFIX}" for p in dense}
    missing = sorted(expected - set(header))
    extra = sorted(set(header) - expected)
    if missing or extra:
        _fail(wpath, f"keys do not match carrier_config.json: missing {missing[:3]}"
                     f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected "
                     f"{extra[:3]}{'...' if len(extra) > 3 else ''} ({len(extra)})")
    if cfg["format_version"] >= 2 and set(cfg["tensor_sha256"]) != set(header):
        diff = sorted(set(cfg["tensor_sha256"]) ^ set(header))
        _fail(d / CONFIG_NAME, f"tensor_sha256 does not list exactly the tensors of {WEIGHTS_NAME} (differs on "
                               f"{diff[:3]}); the two files do not belong together")
    dtype = DTYPES[cfg["dtype"]]
    size = {}
    for layer, proj, path in paths:
        n, k = dims.shape(proj)
        (rd, rs), (cd, cs), (dd, ds) = (header[f"{path}.{s}"] for s in SUFFIXES)
        if rd != torch.int32 or cd != torch.int32:
            _fail(f"{wpath}: {path}", f"rows/cols must be int32, got {rd} / {cd}")
        if len(rs) != 1 or len(cs) != 1 or rs[0] > n or cs[0] > k:
            _fail(f"{wpath}: {path}", f"carrier_rows {list(rs)} / carrier_cols {list(cs)} must be vectors of at most "
                                      f"{n} / {k} indices")
        if dd != dtype:
            _fail(f"{wpath}: {path}", f"carrier_delta has dtype {dd} but the carrier's dtype is {dtype}")
        if ds != (rs[0], cs[0]):
            _fail(f"{wpath}: {path}", f"carrier_delta has shape {ds}, expected (|rows|, |cols|) = ({rs[0]}, {cs[0]})")
        size[path] = (rs[0], cs[0])
    if cfg.get("theta_file"):
        theta_path = d / THETA_NAME
        th = read_header(theta_path)
        if set(th) != {"theta"}:
            _fail(theta_path, f"must hold exactly the key 'theta', got {sorted(th)[:5]}")
        if not th["theta"][0].is_floating_point:
            _fail(theta_path, f"theta must hold floating-point mask logits, got {th['theta'][0]}")
        if th["theta"][1] != (dims.num_masks,):
            _fail(theta_path, f"theta has shape {th['theta'][1]}, expected ({dims.num_masks},) for these dims")
    counts = []
    for layer in range(dims.num_layers):
        prefix = f"{fam.layers}.{layer}."
        group = {g: size[prefix + p][0 if side == "rows" else 1] for g, (p, side) in GROUP_SOURCE.items()}
        for proj in fam.projections:
            for side, g in (("rows", proj.rows), ("cols", proj.cols)):
                want = group[g] * (dims.gqa_groups if side == "cols" and proj.gqa_cols else 1)
                if size[prefix + proj.path][0 if side == "rows" else 1] != want:
                    path = GROUP_SOURCE[g][0]
                    _fail(f"{wpath}: {prefix}{proj.path}",
                          f"its {side} disagree with the {g!r} mask used by {path}; "
                          "the carrier is inconsistent (edited or assembled from different carriers)")
        counts.append(group)
    for p, info in dense.items():
        dt, shape = header[f"{p}.{DENSE_SUFFIX}"]
        if dt != dtype or list(shape) != info["shape"]:
            _fail(f"{wpath}: {p}.{DENSE_SUFFIX}", f"is {dt} of shape {list(shape)} but carrier_config.json records "
                                                  f"{info['dtype']} of shape {info['shape']}")
    spars, actual = summaries(sparsity_stats(counts, dims))  # as Carrier.config writes them
    if cfg["active"] != actual:
        _fail(d, f"carrier_config.json records {cfg['active']} active entries but {WEIGHTS_NAME} holds "
                 f"{actual}; the two files come from different carriers")
    if (abs(cfg["sparsity"]["overall"] - spars["overall"]) > 1e-9
            or any(abs(cfg["sparsity"]["groups"][g] - spars["groups"][g]) > 1e-9 for g in GROUPS)):
        _fail(d / CONFIG_NAME, f"sparsity {cfg['sparsity']} does not follow from the tensors' active counts "
                               f"({spars}); the two files come from different carriers")
    n_proj = projection_numel(fam, dims)
    n_car = sum(r * c for r, c in size.values())
    num = {"carrier": n_car, "projections": n_proj}
    if cfg["format_version"] >= 2:
        num["dense"] = sum(math.prod(header[f"{p}.{DENSE_SUFFIX}"][1]) for p in dense)
    rec = cfg["num_parameters"]
    if any(rec[k] != v for k, v in num.items()) or abs(rec["ratio"] - (n_car / n_proj if n_proj else 0.0)) > 1e-9:
        _fail(d / CONFIG_NAME, f"num_parameters {rec} does not match the tensors ({num}); the two files come from "
                               "different carriers")
    return paths


def read_carrier(directory: str | os.PathLike, device: torch.device | str = "cpu",
                 check: Callable[[Path], None] | None = None) -> Carrier:
    """Read and validate a carrier directory written by :meth:`Carrier.save` (format 1 or 2):
    :func:`~lcdd_kernels.carriers.load.load_carrier` without the signature.

    ``check``: run on the directory before each read (load_carrier's signature check); a read is
    then kept only if the directory was not replaced meanwhile.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"carrier directory {d} does not exist")
    # A writer publishing a new version (Carrier.save swaps whole directories) while this reads can
    # hand it files of two versions, or a verified version and then another; the directory's inode
    # tells: read again when it changed. A file replaced or edited inside the directory between the
    # signature check and the read keeps that inode, so a verified read also compares each file's
    # inode, size and change time (which no unprivileged writer can set back).
    for attempt in range(_READ_TRIES):
        before = _dir_id(d)
        files = _files_id(d) if check is not None else None
        try:
            carrier = _load_once(d, device, check)
        except (ValueError, OSError):
            if attempt + 1 < _READ_TRIES and _dir_id(d) != before:
                continue
            raise
        if check is None or (_dir_id(d) == before and _files_id(d) == files):
            return carrier
    raise RuntimeError(f"{d} was replaced {_READ_TRIES} times while it was being verified and read; "
                       "load it when its writer is done")


_READ_TRIES = 3


def _dir_id(d: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(d)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _files_id(d: Path) -> tuple:
    try:
        with os.scandir(d) as it:
            return tuple(sorted((e.name, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                                for e in it for s in [e.stat(follow_symlinks=False)]))
    except OSError:
        return ()


def _load_once(d: Path, device, check) -> Carrier:
    if check is not None:
        check(d)
    cfg = read_config(d)
    fam, dims = cfg["_family"], cfg["_dims"]
    header = read_header(d / WEIGHTS_NAME)
    paths = _check_header(cfg, header, d)
    theta_path = d / THETA_NAME
    tensors = _read_safetensors(d / WEIGHTS_NAME)
    theta = _read_safetensors(theta_path)["theta"] if cfg.get("theta_file") else None
    modules = {p: CarrierModule(*(tensors[f"{p}.{s}"] for s in SUFFIXES)) for _, _, p in paths}
    dense = {p: tensors[f"{p}.{DENSE_SUFFIX}"] for p in cfg.get("dense_parameters", {})}
    token = _WHERE.set(str(d / WEIGHTS_NAME))
    try:
        carrier = Carrier(modules, fam.name, dims, DTYPES[cfg["dtype"]], cfg["base_model"]["fingerprint"],
                          cfg["base_model"].get("name_or_path"), theta, dict(cfg.get("metadata") or {}), dense)
    finally:
        _WHERE.reset(token)
    if cfg["format_version"] >= 2:
        for key, t in tensors.items():
            got = tensor_sha256(t)
            if got != cfg["tensor_sha256"][key]:
                _fail(d / WEIGHTS_NAME, f"tensor {key} does not match its SHA-256 in {CONFIG_NAME} (recorded "
                                        f"{cfg['tensor_sha256'][key][:12]}…, file {got[:12]}…): the file was "
                                        "damaged or edited; save or copy the carrier again")
        if theta is not None and tensor_sha256(theta) != cfg["theta_sha256"]:
            _fail(theta_path, f"tensor theta does not match theta_sha256 in {CONFIG_NAME}: the file was damaged "
                              "or edited; save or copy the carrier again")
    else:
        log.warning("%s is a format-1 carrier: it has no content hashes, so damage to its tensors cannot be "
                    "detected; re-save it (load_carrier(...).save(new_dir)) to get format %d", d, FORMAT_VERSION)
    if torch.device(device) != torch.device("cpu"):
        carrier.modules = {p: CarrierModule(*(t.to(device) for t in (m.rows, m.cols, m.delta)))
                           for p, m in carrier.modules.items()}
        carrier.dense = {p: t.to(device) for p, t in carrier.dense.items()}
    return carrier
