"""Sparse carrier inference (SPEC §4): ``y = x·Bᵀ + b``, then ``y[..., rows] += x[..., cols]·Δᵀ``.

Two public ops: :func:`carrier_linear` (one carrier on every token) and :func:`bank_linear` (a
carrier per token, from a :class:`~lcdd_kernels.CarrierBank`, −1 for none). Both run on one
internal form, :class:`CarrierTable`: the carriers of one projection as per-slot tensors plus an
int64 (slots, 6) table of pointers and sizes laid out as the C API's ``lcdd_carrier_view``, so the
Triton, CUDA and C++ kernels all read the same table and adding a carrier to a bank only rebuilds
that small table.

Backends (``_backend.select``; ``LCDD_BACKEND`` / ``backend=`` override):

- ``cuda``  (CUDA tensors, T ≤ 16 by default): fused batched GEMV in ``_C``, one pass over the base
  weight and over each used delta;
- ``triton`` (CUDA tensors, larger T): base GEMM by cuBLAS, then one Triton launch adds every
  carrier's rows in place (see carrier_triton.py for why this split);
- ``cpp`` (CPU tensors): PyTorch's GEMM (oneDNN / MKL: the floor on a CPU) for the base, then
  the C++ carrier add of ``_C`` in place (the library's fused CPU entry point serves C callers);
- ``torch``: PyTorch GEMM then ``index_select`` / ``mm`` / ``index_add_`` in place;
- ``reference``: the same math out of place, literally, differentiable in every input.

Gradients: inference ops. Every backend is differentiable in ``x`` (so a soft prompt can be
optimised through a carrier model, SPEC §5); base weight, deltas and bias are constants. When
autograd is recording and one of them requires grad, the op refuses (it would otherwise drop
that gradient silently): freeze the weights, run under ``torch.no_grad()`` /
``torch.inference_mode()``, or use ``backend="reference"`` for weight gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _backend, _checks
from . import _native
from .masked_delta import _autocast, _flat

__all__ = ["carrier_linear", "bank_linear", "carrier_linear_ref", "bank_linear_ref", "CarrierTable"]

_IMPLEMENTED = ("triton", "cuda", "cpp", "torch", "reference")
#: Batches up to this many tokens are "decode": the CUDA backend is preferred for them.
DECODE_TOKENS = 16

# ---------------------------------------------------------------------------------------------
# References: SPEC §4 literally (index_select + matmul + index_add), out of place.
# ---------------------------------------------------------------------------------------------


def carrier_linear_ref(x, base_weight, delta, rows, cols, bias=None):
    """(..., K), (N, K), (R, C), (R,), (C,), (N,) -> (..., N)."""
    y = F.linear(x, base_weight, bias)
    return y.index_add(-1, rows, F.linear(x.index_select(-1, cols), delta))


def bank_linear_ref(x, base_weight, carriers, carrier_ids, bias=None):
    """``carriers``: one (delta, rows, cols) or None per carrier id; ``carrier_ids``: (T,) with
    T = x.numel() / K, −1 for none. Returns (..., N)."""
    n, k = base_weight.shape
    y = _flat(F.linear(x, base_weight, bias), n)
    x2 = _flat(x, k)
    for c, item in enumerate(carriers):
        if item is None:
            continue
        delta, rows, cols = item
        t = (carrier_ids == c).nonzero().flatten()
        part = F.linear(x2.index_select(0, t).index_select(1, cols), delta)
        y = y.index_put((t[:, None], rows.long()[None, :]), part, accumulate=True)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------
# The kernels' form of a projection's carriers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    delta: torch.Tensor  # (R, C) contiguous, the activation dtype
    rows: torch.Tensor  # (R,) int32 contiguous
    cols: torch.Tensor  # (C,) int32 contiguous
    row_slots: torch.Tensor | None  # (N,) int32: index in rows or -1 (CUDA kernels only)


def row_slots(rows: torch.Tensor, out_features: int) -> torch.Tensor:
    """(R,) sorted unique rows -> (N,) int32 with ``slots[rows[j]] = j`` and −1 elsewhere."""
    slots = torch.full((out_features,), -1, dtype=torch.int32, device=rows.device)
    slots[rows.long()] = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device)
    return slots


class CarrierTable:
    """The carriers of one projection as the kernels read them: slot i holds one carrier's
    (delta, rows, cols[, row_slots]) or nothing. ``views`` is the int64 (slots, 6) table of
    ``lcdd_carrier_view`` (pointers and sizes) on the tensors' device; this object keeps every
    tensor it points to alive. Immutable: a bank builds a new table when its carriers change."""

    def __init__(self, out_features: int, in_features: int, entries: list[_Entry | None],
                 device: torch.device):
        self.out_features, self.in_features = out_features, in_features
        self.entries = entries
        rows = [[0] * 6 if e is None else
                [_native.ptr(e.delta), _native.ptr(e.rows), _native.ptr(e.cols), _native.ptr(e.row_slots),
                 e.rows.numel(), e.cols.numel()] for e in entries]
        self.views = torch.tensor(rows, dtype=torch.int64).reshape(len(entries), 6).to(device)
        self.max_rows = max((e.rows.numel() for e in entries if e is not None and e.cols.numel()), default=0)

    @staticmethod
    def entry(delta, rows, cols, out_features: int, slots: bool) -> _Entry:
        rows = rows.to(torch.int32).contiguous()
        return _Entry(delta.contiguous(), rows, cols.to(torch.int32).contiguous(),
                      row_slots(rows, out_features) if slots else None)

    def __len__(self) -> int:
        return len(self.entries)


# ---------------------------------------------------------------------------------------------
# Backends. x2: (T, K) with unit column stride; ids: (T,) int32 on x's device, or None for
# "slot 0 on every token"; routing: cached (tok, seg) for the Triton kernel.
# ---------------------------------------------------------------------------------------------


def _base(x2, base_weight, bias):
    y2 = x2.new_empty(x2.shape[0], base_weight.shape[0])
    if bias is None:
        return torch.mm(x2, base_weight.t(), out=y2)
    return torch.addmm(bias, x2, base_weight.t(), out=y2)


def route(ids: torch.Tensor | None, n_slots: int, n_tokens: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Token order grouped by slot and the (slots + 1,) offsets, with no host sync: slot c's
    tokens are ``tok[seg[c]:seg[c + 1]]`` (tokens with id −1 sort first and are skipped; so do
    ids outside [−1, n_slots), which only unchecked ids can hold: see :func:`bank_linear`)."""
    if ids is None:
        return None, torch.tensor([0, n_tokens], dtype=torch.int32, device=device)
    key = ids.long() + 1
    key = key.masked_fill((key < 0) | (key > n_slots), 0)
    tok = torch.argsort(key, stable=True).to(torch.int32)
    seg = torch.cumsum(torch.bincount(key, minlength=n_slots + 1), 0).to(torch.int32)
    return tok, seg


def ids_or_base(ids: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Unchecked ids with every id outside [−1, n_slots) replaced by −1 (on the device, no host
    sync): the native kernels index their table by id, so they get only ids in range."""
    return ids.masked_fill((ids < -1) | (ids >= n_slots), -1)


def _slot_tokens(ids, entries, n_tokens, device):
    """(entry, its tokens) for every non-empty carrier that has tokens. Without ids slot 0
    takes every token; with ids, one ``route`` and one host copy of its offsets for all slots
    (instead of a ``nonzero`` sync per slot)."""
    if ids is None:
        e = entries[0] if entries else None
        return [] if e is None or e.delta.numel() == 0 else [(e, torch.arange(n_tokens, device=device))]
    tok, seg = route(ids, len(entries), n_tokens, device)
    bounds = seg.tolist()
    return [(e, tok[bounds[c]:bounds[c + 1]].long()) for c, e in enumerate(entries)
            if e is not None and e.delta.numel() and bounds[c + 1] > bounds[c]]


def _torch_add_(y2, x2, table, ids):
    for e, t in _slot_tokens(ids, table.entries, x2.shape[0], x2.device):
        if ids is None:
            y2.index_add_(1, e.rows, torch.mm(x2.index_select(1, e.cols), e.delta.t()))
        else:
            part = torch.mm(x2.index_select(0, t).index_select(1, e.cols), e.delta.t())
            y2.index_put_((t[:, None], e.rows.long()[None, :]), part, accumulate=True)


def _forward(name, x2, base_weight, bias, table, ids, routing):
    n_tok, n_out, n_in = x2.shape[0], base_weight.shape[0], base_weight.shape[1]
    dt = _native.DTYPE[x2.dtype]
    ids_ptr = _native.ptr(ids)
    if name == "cuda":
        y2 = x2.new_empty(n_tok, n_out)
        _native.lib().carrier_linear_cuda(
            _native.ptr(x2), x2.stride(0), _native.ptr(base_weight), _native.ptr(bias), _native.ptr(y2),
            n_tok, n_out, n_in, dt, _native.ptr(table.views), len(table), ids_ptr, _native.stream(x2.device))
        return y2
    y2 = _base(x2, base_weight, bias)
    if name == "cpp":
        _native.lib().carrier_add_cpu(_native.ptr(x2), x2.stride(0), _native.ptr(y2), n_tok, n_out, n_in, dt,
                                      _native.ptr(table.views), len(table), ids_ptr)
    elif name == "triton":
        from . import carrier_triton

        tok, seg = routing if routing is not None else route(ids, len(table), n_tok, x2.device)
        carrier_triton.carrier_add_(y2, x2, table.views, tok, seg, table.max_rows)
    else:
        _torch_add_(y2, x2, table, ids)
    return y2


class _CarrierFunction(torch.autograd.Function):
    """Any backend's forward; backward to x only: dx = dy·B + Σ_c scatter(dy[t, rows_c]·Δ_c, cols_c)."""

    @staticmethod
    def forward(ctx, x2, base_weight, bias, table, ids, routing, name):
        ctx.table, ctx.ids = table, ids
        ctx.save_for_backward(base_weight)
        return _forward(name, x2, base_weight, bias, table, ids, routing)

    @staticmethod
    def backward(ctx, gy):
        (base_weight,) = ctx.saved_tensors
        gy = gy.to(base_weight.dtype)
        dx = torch.mm(gy, base_weight)
        for e, t in _slot_tokens(ctx.ids, ctx.table.entries, gy.shape[0], gy.device):
            part = torch.mm(gy.index_select(0, t).index_select(1, e.rows), e.delta)
            dx.index_put_((t[:, None], e.cols.long()[None, :]), part, accumulate=True)
        return dx, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Checks and dispatch
# ---------------------------------------------------------------------------------------------


def _check_linear(op, x, base_weight, bias):
    _checks.floating(op, "x", x)
    _checks.min_ndim(op, "x", x, 1, "(..., K)")
    _checks.floating(op, "base_weight", base_weight)
    _checks.ndim(op, "base_weight", base_weight, 2, "(N, K)")
    _checks.same_dtype(op, "x", x, base_weight=base_weight, bias=bias)
    _checks.same_device(op, "x", x, base_weight=base_weight, bias=bias)
    n, k = base_weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)} but base_weight has K = {k} input features "
                         f"(shape ({n}, {k})); x must be (..., {k})")
    if bias is not None:
        _checks.floating(op, "bias", bias)
        _checks.shape(op, "bias", bias, (n,), "(one per output row)")


def _check_carrier(op, x, base_weight, delta, rows, cols):
    n, k = base_weight.shape
    _checks.index_vector(op, "rows", rows, n, x.device)
    _checks.index_vector(op, "cols", cols, k, x.device)
    _checks.floating(op, "delta", delta)
    _checks.ndim(op, "delta", delta, 2, "(|rows|, |cols|)")
    _checks.shape(op, "delta", delta, (rows.numel(), cols.numel()), "(|rows|, |cols|)")
    _checks.same_dtype(op, "x", x, delta=delta)
    _checks.same_device(op, "x", x, delta=delta)


def _no_weight_grads(op, base_weight, bias, deltas):
    """The non-reference backends differentiate x only: refuse weights that want a gradient."""
    if not torch.is_grad_enabled():
        return
    for what, t in (("base_weight", base_weight), ("bias", bias)):
        if t is not None and t.requires_grad:
            break
    else:
        what, t = "delta", next((d for d in deltas if d.requires_grad), None)
    if t is not None:
        raise ValueError(
            f"{op}: {what} requires grad, but this op computes gradients for x only (an inference op); "
            f"freeze it ({what}.requires_grad_(False), or model.requires_grad_(False)), run under "
            f"torch.no_grad() / torch.inference_mode(), or pass backend='reference' for weight gradients")


_SELECTED: dict = {}


def _select(op, x, n_tok, backend):
    """The backend for one call; memoised on everything the choice depends on (the per-call
    cost matters at decode sizes, where a GPU kernel takes a few microseconds)."""
    key = (op, x.device, n_tok <= DECODE_TOKENS, x.dtype == torch.float64, backend, _backend.requested(),
           _backend.native_available(), _backend.triton_interpret())
    name = _SELECTED.get(key)
    if name is None:
        name = _SELECTED[key] = _select_uncached(op, x, n_tok, backend)
    return name


def _select_uncached(op, x, n_tok, backend):
    auto = ("cuda", "triton", "cpp", "torch") if n_tok <= DECODE_TOKENS else ("triton", "cpp", "torch")
    name = _backend.select(op, x.device, _IMPLEMENTED, auto, backend)
    if name == "cuda" and x.dtype == torch.float64:
        if backend is not None or _backend.requested() == "cuda":
            raise ValueError(f"{op}: backend 'cuda' supports float32, float16 and bfloat16, got float64; "
                             "use backend='torch' or 'triton' for float64")
        name = _backend.select(op, x.device, _IMPLEMENTED, ("triton", "torch"), None)
    return name


def _run(op, name, x, base_weight, bias, table, ids, routing, deltas):
    n, k = base_weight.shape
    x2 = _flat(x, k)
    _no_weight_grads(op, base_weight, bias, deltas)
    if name in ("cuda", "cpp", "triton"):
        if not base_weight.is_contiguous() and name != "triton":
            raise ValueError(f"{op}: base_weight must be contiguous for the {name!r} backend (it reads raw "
                             f"rows); pass base_weight.contiguous() or use backend='torch'")
        # The kernels read rows of unit column stride, K apart at least (the C API's x_stride ≥ K).
        # An expanded x (row stride 0) is "contiguous" to torch when it has one row, so this
        # copies with clone, which always lays rows out K apart.
        if x2.stride(-1) != 1 or x2.stride(0) < k:
            x2 = x2.clone(memory_format=torch.contiguous_format)
        bias = bias.contiguous() if bias is not None else None
    if torch.is_grad_enabled() and x.requires_grad:
        y2 = _CarrierFunction.apply(x2, base_weight, bias, table, ids, routing, name)
    else:
        y2 = _forward(name, x2, base_weight, bias, table, ids, routing)
    return y2.view(*x.shape[:-1], n)


def carrier_linear(x, base_weight, delta, rows, cols, bias=None, *, backend=None):
    """One carrier on every token (SPEC §4): ``y = x·Bᵀ + b``, then ``y[..., rows] += x[..., cols]·Δᵀ``.

    Args:
        x: (..., K) activations.
        base_weight: (N, K) base weight B (contiguous for the native backends).
        delta: (R, C) compact delta Δ, x's dtype and device.
        rows: (R,) int32/int64 output rows, sorted, unique, in [0, N); R = 0 is allowed.
        cols: (C,) int32/int64 input columns, sorted, unique, in [0, K); C = 0 is allowed.
        bias: (N,) or None.
        backend: "cuda", "triton", "cpp", "torch" or "reference"; default from ``LCDD_BACKEND`` /
            device / batch size (see the module docstring).

    Returns:
        (..., N) in x's dtype. Differentiable in x only (an inference op; see the module docstring).
        Every call checks rows and cols (sorted, unique, in range: host syncs on a GPU) and builds a
        one-slot table; a :class:`~lcdd_kernels.CarrierBank` does both once per carrier instead.
    """
    op = "carrier_linear"
    _check_linear(op, x, base_weight, bias)
    _check_carrier(op, x, base_weight, delta, rows, cols)
    x, base_weight, delta, bias = _autocast(x, base_weight, delta, bias)
    name = _select(op, x, math.prod(x.shape[:-1]), backend)
    if name == "reference":
        return carrier_linear_ref(x, base_weight, delta, rows, cols, bias)
    n, k = base_weight.shape
    table = CarrierTable(n, k, [CarrierTable.entry(delta, rows, cols, n, slots=name == "cuda")], x.device)
    return _run(op, name, x, base_weight, bias, table, None, None, (delta,))


def bank_linear(x, base_weight, bank, module_name, carrier_ids, bias=None, *, backend=None, check_ids=True):
    """A carrier per token from a bank: ``y_t = x_t·Bᵀ + b`` plus carrier ``carrier_ids[t]``'s rows.

    Args:
        x: (..., K) activations; T = x.numel() / K tokens in row-major order.
        base_weight: (N, K) base weight of the projection ``module_name``.
        bank: a :class:`~lcdd_kernels.CarrierBank` holding carriers for this base model.
        module_name: the projection's path in the model (``"model.layers.0.mlp.up_proj"``).
        carrier_ids: (T,) int32/int64 carrier id per token (``bank.add`` returns ids), −1 for none.
        bias: (N,) or None.
        backend: as for :func:`carrier_linear`.
        check_ids: check that every id is −1 or a carrier in the bank (one reduction and one
            host sync on a GPU), else raise. With False nothing is checked and every id outside
            the bank counts as −1, on every backend alike: an id < −1, ≥ the bank's slot count,
            or of a removed carrier adds nothing (the token gets the base projection). For ids
            checked already, e.g. once per forward as ``bank.carriers(...)`` does.

    Returns:
        (..., N) in x's dtype; differentiable in x only.
    """
    op = "bank_linear"
    _check_linear(op, x, base_weight, bias)
    n_tok = math.prod(x.shape[:-1])
    _checks.tensor(op, "carrier_ids", carrier_ids)
    if carrier_ids.dtype not in _checks.INDEX_DTYPES:
        raise TypeError(f"{op}: carrier_ids must be int32 or int64, got {carrier_ids.dtype}")
    _checks.shape(op, "carrier_ids", carrier_ids, (n_tok,), f"(one carrier id per token: x holds {n_tok})")
    _checks.same_device(op, "x", x, carrier_ids=carrier_ids)
    if check_ids:
        bank.check_ids(carrier_ids, op)
    return _bank_linear(x, base_weight, bias, bank, module_name, carrier_ids, backend, checked=check_ids)


def _bank_linear(x, base_weight, bias, bank, module_name, carrier_ids, backend=None, checked=True):
    """:func:`bank_linear` after its argument checks. A bank-served model's projections call this
    directly: their weight and bias are the model's, the context's ids were checked once.
    ``checked=False``: ids may lie outside the bank (they then mean −1, see bank_linear)."""
    op = "bank_linear"
    x, base_weight, bias = _autocast(x, base_weight, bias)
    n, k = base_weight.shape
    table = bank.table(module_name, x.device, x.dtype, (n, k))
    name = _select(op, x, math.prod(x.shape[:-1]), backend)
    if name == "reference":  # ids outside the table match no carrier there
        items = [None if e is None else (e.delta, e.rows, e.cols) for e in table.entries]
        return bank_linear_ref(x, base_weight, items, carrier_ids, bias)
    ids = carrier_ids
    if not checked and (name in ("cpp", "cuda") or ids.dtype != torch.int32):
        # The native kernels index their table by id, and an int64 id could wrap into range as
        # int32; torch and Triton skip out-of-range int32 ids themselves (route()).
        ids = ids_or_base(ids, len(table))
    ids = (ids if ids.dtype == torch.int32 else ids.to(torch.int32)).contiguous()
    routing = bank.routing(ids, len(table)) if name == "triton" else None
    return _run(op, name, x, base_weight, bias, table, ids, routing, (e.delta for e in table.entries if e))
