"""Sparse carrier inference (SPEC §4): ``y = x·Bᵀ + b``, then ``y[..., rows] += x[..., cols]·Δᵀ``.

Two public ops: :func:`carrier_linear` (one carrier on every token) and :func:`bank_linear` (a
carrier per token, from a :class:`~lcdd_kernels.CarrierBank`, −1 for none). Both check their
arguments on every call (one-off use); the hot path is the prepared form,
:class:`~lcdd_kernels.ops.carrier_plan.CarrierPlan` (checked once, then no per-call check). Both run on one
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
from ._blocks import flat
from .masked_delta import _autocast

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
    y = flat(F.linear(x, base_weight, bias), n)
    x2 = flat(x, k)
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
        # The same tensors as op inputs (the torch backend and the backward read them; an empty
        # slot is an empty (0, 0) delta), in slot order.
        empty_i = torch.empty(0, dtype=torch.int32, device=device)
        self.deltas = [torch.empty(0, 0, device=device) if e is None else e.delta for e in entries]
        self.rows = [empty_i if e is None else e.rows for e in entries]
        self.cols = [empty_i if e is None else e.cols for e in entries]

    def mark_static(self) -> None:
        """Tell torch.compile that these tensors keep their addresses (a CUDA graph then reads
        them in place instead of copying them in before every replay)."""
        for t in (self.views, *self.deltas, *self.rows, *self.cols):
            torch._dynamo.mark_static_address(t)

    @staticmethod
    def entry(delta, rows, cols, out_features: int, slots: bool) -> _Entry:
        # the indices are copied (they are small): the prepared paths check them once and then
        # index memory with them unchecked, so a caller's later edit must not reach the kernels
        rows = rows.to(torch.int32, copy=True).contiguous()
        return _Entry(delta.contiguous(), rows, cols.to(torch.int32, copy=True).contiguous(),
                      row_slots(rows, out_features) if slots else None)

    def __len__(self) -> int:
        return len(self.entries)


# ---------------------------------------------------------------------------------------------
# Backends. x2: (T, K) with unit column stride; ids: (T,) int32 on x's device, or None for
# "slot 0 on every token". Nothing here synchronises with the host on a GPU (no .item(),
# .tolist(), nonzero or bincount), so that a decode step can be captured in a CUDA graph.
# ---------------------------------------------------------------------------------------------


def _base(x2, base_weight, bias):
    y2 = x2.new_empty(x2.shape[0], base_weight.shape[0])
    if bias is None:
        return torch.mm(x2, base_weight.t(), out=y2)
    return torch.addmm(bias, x2, base_weight.t(), out=y2)


def route(ids: torch.Tensor | None, n_slots: int, n_tokens: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Token order grouped by slot and the (slots + 1,) offsets, with no host sync: slot c's
    tokens are ``tok[seg[c]:seg[c + 1]]`` (tokens with id −1 sort first and are skipped; so do
    ids outside [−1, n_slots), which only unchecked ids can hold: see :func:`bank_linear`).
    ``seg[c]`` = number of tokens whose key (id + 1) is at most c, by a search in the sorted keys
    (a bincount would size its output from the largest key: a host sync on CUDA)."""
    if ids is None:
        return None, torch.tensor([0, n_tokens], dtype=torch.int32, device=device)
    key = ids.long() + 1
    key = key.masked_fill((key < 0) | (key > n_slots), 0)
    tok = torch.argsort(key, stable=True)
    bounds = torch.arange(n_slots + 1, dtype=key.dtype, device=device)
    seg = torch.searchsorted(key[tok].contiguous(), bounds, right=True).to(torch.int32)
    return tok.to(torch.int32), seg


def ids_or_base(ids: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Unchecked ids with every id outside [−1, n_slots) replaced by −1 (on the device, no host
    sync): the native kernels index their table by id, so they get only ids in range."""
    return ids.masked_fill((ids < -1) | (ids >= n_slots), -1)


def _torch_add_(y2, x2, deltas, rows, cols, ids):
    """``y[t, rows_c] += x[t, cols_c]·Δ_cᵀ`` for every slot c and its tokens. On the CPU the tokens
    are grouped by slot (one host read of the offsets, free there); on a GPU each slot's rows are
    computed for every token and kept where the id matches (no host sync, more work)."""
    if ids is None:
        if deltas and deltas[0].numel():
            y2.index_add_(1, rows[0], torch.mm(x2.index_select(1, cols[0]), deltas[0].t()))
        return
    (_torch_add_routed_ if x2.device.type == "cpu" else _torch_add_masked_)(y2, x2, deltas, rows, cols, ids)


def _torch_add_routed_(y2, x2, deltas, rows, cols, ids):
    tok, seg = route(ids, len(deltas), x2.shape[0], x2.device)
    bounds = seg.tolist()
    for c, delta in enumerate(deltas):
        if delta.numel() == 0 or bounds[c + 1] == bounds[c]:
            continue
        t = tok[bounds[c]:bounds[c + 1]].long()
        part = torch.mm(x2.index_select(0, t).index_select(1, cols[c]), delta.t())
        y2.index_put_((t[:, None], rows[c].long()[None, :]), part, accumulate=True)


def _torch_add_masked_(y2, x2, deltas, rows, cols, ids):
    for c, delta in enumerate(deltas):
        if delta.numel() == 0:
            continue
        part = torch.mm(x2.index_select(1, cols[c]), delta.t())
        y2.index_add_(1, rows[c], torch.where((ids == c)[:, None], part, 0))


def _table_forward(x, base_weight, bias, ids, views, deltas, rows, cols, max_rows, backend):
    n, k = base_weight.shape
    x2 = flat(x, k)
    # The kernels read rows of unit column stride, K apart at least (the C API's x_stride ≥ K).
    # An expanded x (row stride 0) is "contiguous" to torch when it has one row, so this copies
    # with clone, which always lays rows out K apart.
    if x2.stride(-1) != 1 or x2.stride(0) < k:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    n_tok, n_slots = x2.shape[0], views.shape[0]
    if backend in ("cuda", "cpp"):
        base_weight = base_weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
    ids_ptr = _native.ptr(ids)
    if backend == "cuda":
        y2 = x2.new_empty(n_tok, n)
        _native.lib().carrier_linear_cuda(
            _native.ptr(x2), x2.stride(0), _native.ptr(base_weight), _native.ptr(bias), _native.ptr(y2),
            n_tok, n, k, _native.DTYPE[x2.dtype], _native.ptr(views), n_slots, ids_ptr, _native.stream(x2.device))
    else:
        y2 = _base(x2, base_weight, bias)
        if backend == "cpp":
            _native.lib().carrier_add_cpu(_native.ptr(x2), x2.stride(0), _native.ptr(y2), n_tok, n, k,
                                          _native.DTYPE[x2.dtype], _native.ptr(views), n_slots, ids_ptr)
        elif backend == "triton":
            from . import carrier_triton

            # without ids only slot 0 applies (seg then has two entries: one slot's offsets)
            tok, seg = route(ids, n_slots, n_tok, x2.device)
            carrier_triton.carrier_add_(y2, x2, views if ids is not None else views[:1], tok, seg, max_rows)
        else:
            _torch_add_(y2, x2, deltas, rows, cols, ids)
    return y2.view(*x.shape[:-1], n)


def _table_dx(gy, x_shape, base_weight, ids, deltas, rows, cols):
    """dx = dy·B + Σ_c scatter(dy[t, rows_c]·Δ_c, cols_c) over the tokens t of slot c; each slot's
    rows for every token, kept where the id matches (plain PyTorch ops: a compiled backward
    traces them; no host sync)."""
    n, k = base_weight.shape
    g2 = flat(gy, n).to(base_weight.dtype)
    dx = torch.mm(g2, base_weight)
    for c, delta in enumerate(deltas):
        if delta.numel() == 0 or (ids is None and c > 0):
            continue
        part = torch.mm(g2.index_select(1, rows[c]), delta)
        if ids is not None:
            part = torch.where((ids == c)[:, None], part, 0)
        dx.index_add_(1, cols[c], part)
    return dx.view(x_shape)


# ---------------------------------------------------------------------------------------------
# Registered ops: torch.ops.lcdd.bank_linear (any table of carriers, an id per token or slot 0
# everywhere) and torch.ops.lcdd.carrier_linear (one carrier). Both differentiable in x only.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("lcdd::bank_linear", mutates_args=(), device_types=("cpu", "cuda"))
def _op_bank(x: torch.Tensor, base_weight: torch.Tensor, bias: torch.Tensor | None,
             carrier_ids: torch.Tensor | None, views: torch.Tensor, deltas: list[torch.Tensor],
             rows: list[torch.Tensor], cols: list[torch.Tensor], max_rows: int, backend: str) -> torch.Tensor:
    """The carriers of one projection as a :class:`CarrierTable` (``views`` with its ``deltas``,
    ``rows``, ``cols`` and ``max_rows``); ``carrier_ids`` (T,) int32 per token (−1: none), or
    None for slot 0 on every token. One implementation for both devices: ``backend`` picks the
    code (CUDA: the fused GEMV of ``_C`` for decode, cuBLAS + the Triton carrier add, or torch;
    CPU: the C++ carrier add after PyTorch's GEMM, or torch)."""
    return _table_forward(x, base_weight, bias, carrier_ids, views, deltas, rows, cols, max_rows, backend)


@_op_bank.register_fake
def _(x, base_weight, bias, carrier_ids, views, deltas, rows, cols, max_rows, backend):
    return x.new_empty(*x.shape[:-1], base_weight.shape[0])


def _bank_setup(ctx, inputs, output):
    x, base_weight, bias, ids, views, deltas, rows, cols, max_rows, backend = inputs
    ctx.n_slots, ctx.has_ids = len(deltas), ids is not None
    ctx.save_for_backward(base_weight, *deltas, *rows, *cols, *([ids] if ids is not None else []))


def _bank_grad(ctx, gy):
    saved, s = ctx.saved_tensors, ctx.n_slots
    base_weight, deltas, rows, cols = saved[0], saved[1:1 + s], saved[1 + s:1 + 2 * s], saved[1 + 2 * s:1 + 3 * s]
    ids = saved[-1] if ctx.has_ids else None
    x_shape = (*gy.shape[:-1], base_weight.shape[1])
    dx = _table_dx(gy, x_shape, base_weight, ids, deltas, rows, cols) if ctx.needs_input_grad[0] else None
    return dx, None, None, None, None, [None] * s, [None] * s, [None] * s, None, None


_op_bank.register_autograd(_bank_grad, setup_context=_bank_setup)


def _one_slot(x, base_weight, delta, rows, cols, backend):
    n, k = base_weight.shape
    return CarrierTable(n, k, [CarrierTable.entry(delta, rows, cols, n, slots=backend == "cuda")], x.device)


def _carrier_forward(x, base_weight, delta, rows, cols, bias, backend):
    t = _one_slot(x, base_weight, delta, rows, cols, backend)
    return _table_forward(x, base_weight, bias, None, t.views, t.deltas, t.rows, t.cols, t.max_rows, backend)


@torch.library.custom_op("lcdd::carrier_linear", mutates_args=(), device_types=("cpu", "cuda"))
def _op_carrier(x: torch.Tensor, base_weight: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """One carrier on every token; builds its one-slot table per call (a host-to-device copy on a
    GPU: modules and banks build theirs once and call ``bank_linear``). Both devices, as bank_linear."""
    return _carrier_forward(x, base_weight, delta, rows, cols, bias, backend)


@_op_carrier.register_fake
def _(x, base_weight, delta, rows, cols, bias, backend):
    return x.new_empty(*x.shape[:-1], base_weight.shape[0])


def _carrier_setup(ctx, inputs, output):
    x, base_weight, delta, rows, cols, bias, backend = inputs
    ctx.save_for_backward(base_weight, delta, rows, cols)


def _carrier_grad(ctx, gy):
    base_weight, delta, rows, cols = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    x_shape = (*gy.shape[:-1], base_weight.shape[1])
    return _table_dx(gy, x_shape, base_weight, None, [delta], [rows], [cols]), None, None, None, None, None, None


_op_carrier.register_autograd(_carrier_grad, setup_context=_carrier_setup)


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
    _checks.in_features(op, "x", x, "base_weight", base_weight)
    if bias is not None:
        _checks.floating(op, "bias", bias)
        _checks.shape(op, "bias", bias, (base_weight.shape[0],), "(one per output row)")


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
    """The backend for one call; memoised eagerly on everything the choice depends on (the
    per-call cost matters at decode sizes, where a GPU kernel takes a few microseconds). Under
    torch.compile the choice is made once per trace (a memo dict would put guards on itself)."""
    if torch.compiler.is_compiling():
        return _select_uncached(op, x, n_tok, backend)
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


def _prepare(op, name, base_weight, bias, deltas):
    """Checks every non-reference call needs (cheap metadata only: also run while tracing)."""
    _no_weight_grads(op, base_weight, bias, deltas)
    if name in ("cuda", "cpp") and not base_weight.is_contiguous():
        raise ValueError(f"{op}: base_weight must be contiguous for the {name!r} backend (it reads raw "
                         f"rows); pass base_weight.contiguous() or use backend='torch'")


def table_linear(x, base_weight, bias, table, ids, name, op="bank_linear"):
    """``torch.ops.lcdd.bank_linear`` on a prepared :class:`CarrierTable` (checked already)."""
    _prepare(op, name, base_weight, bias, (d for d in table.deltas))
    return torch.ops.lcdd.bank_linear(x, base_weight, bias, ids, table.views, table.deltas, table.rows,
                                      table.cols, table.max_rows, name)


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
        Eagerly every call checks rows and cols (sorted, unique, in range: host syncs on a GPU;
        skipped under torch.compile) and builds a one-slot table; :func:`apply_carrier` and a
        :class:`~lcdd_kernels.CarrierBank` do both once per carrier instead.
    """
    op = "carrier_linear"
    # before the checks, as masked_delta_linear: under autocast x comes in the autocast dtype
    x, base_weight, delta, bias = _autocast(x, base_weight, delta, bias)
    _check_linear(op, x, base_weight, bias)
    if not torch.compiler.is_compiling():  # data-dependent checks: eager only
        _check_carrier(op, x, base_weight, delta, rows, cols)
    name = _select(op, x, math.prod(x.shape[:-1]), backend)
    if name == "reference":
        return carrier_linear_ref(x, base_weight, delta, rows, cols, bias)
    _prepare(op, name, base_weight, bias, (delta,))
    return torch.ops.lcdd.carrier_linear(x, base_weight, delta, rows.to(torch.int32), cols.to(torch.int32),
                                         bias, name)


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
            checked already, e.g. once per forward as ``bank.carriers(...)`` does. Under
            torch.compile the check (a host sync) is skipped and ids behave as with False.

    Returns:
        (..., N) in x's dtype; differentiable in x only. The registered op behind it is
        ``torch.ops.lcdd.bank_linear``, which takes the bank's table of this projection.
    """
    op = "bank_linear"
    x, base_weight, bias = _autocast(x, base_weight, bias)  # before the checks (see carrier_linear)
    _check_linear(op, x, base_weight, bias)
    n_tok = math.prod(x.shape[:-1])
    # ids are −1 or a carrier of the bank, not indices into a range: the bank checks their values
    _checks.index_tensor(op, "carrier_ids", carrier_ids, None, x.device, "(one carrier id per token)")
    _checks.shape(op, "carrier_ids", carrier_ids, (n_tok,), f"(one carrier id per token: x holds {n_tok})")
    checked = check_ids and not torch.compiler.is_compiling()
    if checked:
        bank.check_ids(carrier_ids, op)
    return _bank_linear(x, base_weight, bias, bank, module_name, carrier_ids, backend, checked=checked)


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
        # int32; torch and Triton skip out-of-range int32 ids themselves (route(), and the
        # masked per-slot add matches no slot).
        ids = ids_or_base(ids, len(table))
    ids = (ids if ids.dtype == torch.int32 else ids.to(torch.int32)).contiguous()
    return table_linear(x, base_weight, bias, table, ids, name)
