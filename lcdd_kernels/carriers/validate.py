"""In-memory validation of a carrier: every structural property a :class:`~lcdd_kernels.Carrier`
must have, run when one is built (so by every load too). Errors name the first problem and, when
loading, the file."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

import torch

from .. import _checks
from ..models.families import FAMILIES, GROUP_SOURCE, GROUPS, Dims
from .layout import DTYPES, projection_paths

if TYPE_CHECKING:
    from .carrier import Carrier


#: What validate_carrier names in its errors: "carrier", or the file being loaded.
_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("lcdd_carrier_where", default="carrier")


def _fail(where, msg: str):
    raise ValueError(f"{where}: {msg}")


def validate_carrier(c: Carrier, where: str | None = None) -> None:
    """Every structural property a carrier must have; raises ValueError naming the first problem
    (and the file, when loading)."""
    where = where or _WHERE.get()
    if c.family not in FAMILIES:
        _fail(where, f"model_type {c.family!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    if c.dtype not in DTYPES.values():
        _fail(where, f"dtype {c.dtype} is not one of {', '.join(DTYPES)}")
    if not isinstance(c.base_fingerprint, str) or not c.base_fingerprint.startswith("sha256:"):
        _fail(where, f"base fingerprint {c.base_fingerprint!r} is not of the form 'sha256:<hex>'")
    if not isinstance(c.metadata, dict):
        _fail(where, f"metadata must be a dict, got {type(c.metadata).__name__}")
    fam = FAMILIES[c.family]
    expected = projection_paths(fam, c.dims.num_layers)
    names = {path for _, _, path in expected}
    missing = [p for _, _, p in expected if p not in c.modules]
    extra = [p for p in c.modules if p not in names]
    if missing or extra:
        _fail(where, f"modules do not match a {c.family} model of {c.dims.num_layers} layers: missing {missing[:3]}"
                     f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for layer, proj, path in expected:
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
    _check_dense(c, where)
    if c.theta is not None:
        _checks.tensor(where, "theta", c.theta)
        if not torch.is_floating_point(c.theta):
            _fail(where, f"theta must hold floating-point mask logits, got {c.theta.dtype}")
        if c.theta.dim() != 1 or c.theta.numel() != c.dims.num_masks:
            _fail(where, f"theta has shape {tuple(c.theta.shape)}, expected ({c.dims.num_masks},)")
        if not bool(torch.isfinite(c.theta).all()):
            _fail(where, "theta holds NaN or inf")
        sizes = c.dims.group_sizes()
        binary = torch.cat([_onehot(layer[g], sizes[g]) for layer in c.active_channels() for g in GROUPS])
        if not torch.equal(binary, c.theta.detach().cpu() > 0):
            _fail(where, "theta's active entries (θ > 0) differ from the carrier's rows and columns; "
                         "theta belongs to another carrier")


def _onehot(ix: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[ix.long().cpu()] = True
    return out


def expand_gqa_indices(v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """The o_proj column indices from the active v indices (SPEC §2), without building a mask:
    kv head ``h``'s entry ``o`` becomes entry ``o`` of query heads ``h·G … h·G + G − 1``."""
    v = v.long().cpu()
    g = dims.gqa_groups
    heads = (v // dims.head_dim)[:, None] * g + torch.arange(g)[None, :]
    return torch.sort((heads * dims.head_dim + (v % dims.head_dim)[:, None]).reshape(-1)).values


def _check_shared_masks(c: Carrier, where: str) -> None:
    """Projections that share a mask group (SPEC §2) must agree on its indices."""
    for layer in range(c.dims.num_layers):
        mods = c.layer_modules(layer)
        for proj in c.family_spec.projections:
            for side, group in (("rows", proj.rows), ("cols", proj.cols)):
                path, src_side = GROUP_SOURCE[group]
                want = getattr(mods[path], src_side)
                got = getattr(mods[proj.path], side)
                if side == "cols" and proj.gqa_cols:
                    want = expand_gqa_indices(want, c.dims) if got.numel() == want.numel() * c.dims.gqa_groups else None
                if want is None or not torch.equal(got.cpu().long(), want.cpu().long()):
                    _fail(f"{where}: {c.family_spec.layers}.{layer}.{proj.path}",
                          f"its {side} disagree with the {group!r} mask used by {path}; "
                          "the carrier is inconsistent (edited or assembled from different carriers)")


def dense_shape_rule(c_family: str, dims: Dims, name: str) -> tuple[int, ...] | None:
    """The shape a dense part of this name must have, when the carrier alone fixes it (projection
    biases, norm weights); None for embeddings / lm_head (the vocabulary size is the model's)."""
    fam = FAMILIES[c_family]
    prefix = fam.layers + "."
    if name.startswith(prefix):
        rest = name[len(prefix):].split(".", 1)
        if len(rest) == 2:
            for proj in fam.projections:
                if rest[1] == f"{proj.path}.bias":
                    return (dims.shape(proj)[0],)
    return None


def _check_dense(c: Carrier, where: str) -> None:
    if not isinstance(c.dense, dict):
        _fail(where, f"dense must be a dict of parameter path -> tensor, got {type(c.dense).__name__}")
    proj_weights = {f"{p}.weight" for p in c.modules}
    for name, t in c.dense.items():
        op = f"{where}: dense part {name!r}"
        if not isinstance(name, str) or not name or len(name) > 512:
            _fail(where, f"dense part names must be parameter paths (strings), got {name!r}")
        if name in proj_weights:
            _fail(op, "is a projection weight; those are stored sparsely (rows, cols, Δ), not as dense parts")
        _checks.tensor(op, "value", t)
        if t.dtype != c.dtype:
            _fail(op, f"has dtype {t.dtype} but the carrier's dtype is {c.dtype}")
        if t.dim() not in (1, 2) or t.numel() == 0:
            _fail(op, f"has shape {tuple(t.shape)}; dense parts are 1-D (norms, biases) or 2-D (embeddings, lm_head)")
        want = dense_shape_rule(c.family, c.dims, name)
        if want is not None and tuple(t.shape) != want:
            _fail(op, f"has shape {tuple(t.shape)}, expected {want} (the projection's out_features)")
        if t.dim() == 1 and name.endswith("norm.weight") and t.shape[0] not in (c.dims.hidden_size, c.dims.head_dim):
            _fail(op, f"has shape {tuple(t.shape)}; a norm weight has hidden_size {c.dims.hidden_size} "
                      f"or head_dim {c.dims.head_dim} entries")
        if t.dim() == 2 and t.shape[1] != c.dims.hidden_size:
            _fail(op, f"has shape {tuple(t.shape)}; a 2-D dense part (embeddings, lm_head) has hidden_size "
                      f"{c.dims.hidden_size} columns")
        if not bool(torch.isfinite(t).all()):
            _fail(op, "holds NaN or inf")
