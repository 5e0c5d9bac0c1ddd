"""Prepared carriers for the hot path: validate once, run many.

A :class:`CarrierPlan` holds the carriers of one projection (out_features N, in_features K) in
slots, checked once when it is built: every ``rows`` / ``cols`` vector 1-D int32/int64, sorted,
unique and in range, every delta (|rows|, |cols|) in the plan's dtype and on its device. Calling
it then does only what the shapes require: attribute checks (no tensor reduction, no ``.item()``,
``.any()`` or ``.cpu()``, so no host synchronisation), then

- CPU, eager, no autograd: one native call, ``lcdd_carrier_linear_prepared_cpu`` (base GEMV/GEMM,
  bias and each token's carrier rows in one pass, written once into the output). For float32 /
  float64 batches above :data:`FUSED_MAX_TOKENS` tokens (prefill), PyTorch's GEMM (MKL / oneDNN)
  writes the output and ``lcdd_carrier_add_prepared_cpu`` adds the rows in place: at those sizes
  the GEMM is compute-bound and the vendor GEMM is faster than the library's own.
- otherwise (CUDA, autograd recording on x, torch.compile, autocast, a backend other than ``cpp``
  forced by ``use_backend`` / ``set_backend``, or by ``LCDD_BACKEND`` when the plan was built):
  the registered op
  ``torch.ops.lcdd.bank_linear`` on the plan's table, with the backend chosen once per device and
  batch class; capturable in a CUDA graph (no host sync) and differentiable in x.

Usage::

    plan = CarrierPlan(base_weight, [(delta0, rows0, cols0), None, (delta2, rows2, cols2)])
    y = plan(x, base_weight, bias, slot_ids)   # slot_ids: (T,) int32, −1 = base only

A slot id outside ``[0, len(plan))`` (−1, a removed carrier's slot, anything an unchecked caller
passes) gives its token the base projection alone, on every device: the plan never reads ids to
validate them. Use :func:`~lcdd_kernels.carrier_linear` / :func:`~lcdd_kernels.bank_linear` for
one-off calls that check everything per call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from .. import _backend, _checks
from . import _native
from .carrier import CarrierTable, _select, ids_or_base

__all__ = ["CarrierPlan", "FUSED_MAX_TOKENS"]

# one C call that is False outside any autocast region (the per-device query parses its argument)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)

_NATIVE = (None, "auto", "cpp")

#: float32 / float64 batches above this many tokens run PyTorch's GEMM then the native carrier
#: add. 16-bit batches do too on CPUs with AVX-512 BF16 or AMX (oneDNN's native bf16 GEMM);
#: elsewhere they always use the fused native call (PyTorch's bf16 / fp16 GEMM then converts per
#: call and is slower than the library's fp32-accumulating one: 0.38-0.39x its time at T = 512
#: on an AVX2 CPU, benchmarks/results/carrier-cpu.json).
FUSED_MAX_TOKENS = 16


def _native_16bit_gemm() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: assume no bf16 GEMM in hardware
        return False


class CarrierPlan:
    """The carriers of one projection, checked once, for many calls.

    Args:
        base: the projection's base weight (N, K) (its shape, device and dtype are taken), or its
            shape ``(N, K)`` (then ``device`` and ``dtype`` are required).
        carriers: one ``(delta, rows, cols)`` or None per slot; slot i serves tokens whose slot id
            is i. ``delta`` (|rows|, |cols|) floating, ``rows`` (R,) / ``cols`` (C,) int32 or int64,
            sorted, unique, in [0, N) / [0, K) (R = 0 or C = 0: an empty carrier, adds nothing).
            Deltas are converted to the plan's dtype and device once, here (a copy only if needed).
        device, dtype: where the plan runs (default: ``base``'s).

    Raises ValueError / TypeError at construction for anything :func:`~lcdd_kernels.carrier_linear`
    refuses per call: indices not 1-D int32/int64, unsorted, repeated or out of range; a delta of
    the wrong shape or not floating; index tensors on another device than the plan.

    The plan keeps every tensor it points to alive and never changes: build a new one when the
    carriers change (a :class:`~lcdd_kernels.CarrierBank` does, per projection).
    """

    def __init__(self, base, carriers: Sequence, *, device=None, dtype=None):
        op = "CarrierPlan"
        if isinstance(base, torch.Tensor):
            _checks.floating(op, "base_weight", base)
            _checks.ndim(op, "base_weight", base, 2, "(N, K)")
            n, k = base.shape
            device = torch.device(device) if device is not None else base.device
            dtype = dtype or base.dtype
        else:
            if not (isinstance(base, Sequence) and len(base) == 2 and all(isinstance(v, int) and v >= 0 for v in base)):
                raise TypeError(f"{op}: base must be the base weight (N, K) or its shape as two ints, got {base!r}")
            if device is None or dtype is None:
                raise ValueError(f"{op}: building from a shape needs device= and dtype= (those of the activations)")
            n, k = base
            device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{op}: dtype must be a floating dtype, got {dtype}")
        entries = []
        for i, item in enumerate(carriers):
            if item is None:
                entries.append(None)
                continue
            where = f"{op}: slot {i}"
            if not (isinstance(item, (tuple, list)) and len(item) == 3):
                raise TypeError(f"{where} must be (delta, rows, cols) or None, got {type(item).__name__}")
            delta, rows, cols = item
            # indices must already be where the plan runs: moving them silently per plan would hide
            # a carrier built for another device
            _checks.index_vector(where, "rows", _checks.tensor(where, "rows", rows), n, device)
            _checks.index_vector(where, "cols", _checks.tensor(where, "cols", cols), k, device)
            _checks.floating(where, "delta", _checks.tensor(where, "delta", delta))
            _checks.ndim(where, "delta", delta, 2, "(|rows|, |cols|)")
            _checks.shape(where, "delta", delta, (rows.numel(), cols.numel()), "(|rows|, |cols|)")
            entries.append(CarrierTable.entry(delta.detach().to(device, dtype), rows, cols, n,
                                              slots=device.type == "cuda"))
        self._init(CarrierTable(n, k, entries, device), dtype)

    @classmethod
    def from_table(cls, table: CarrierTable, dtype: torch.dtype) -> "CarrierPlan":
        """A plan over a :class:`~lcdd_kernels.ops.carrier.CarrierTable` whose entries were
        checked already (a bank checks each carrier when it is added and its extent against
        the projection when it builds the table)."""
        plan = cls.__new__(cls)
        plan._init(table, dtype)
        return plan

    def _init(self, table: CarrierTable, dtype: torch.dtype) -> None:
        self.table = table
        self.out_features, self.in_features = table.out_features, table.in_features
        self.device, self.dtype = table.views.device, dtype
        for i, e in enumerate(table.entries):
            if e is not None and (e.delta.dtype != dtype or e.delta.device != self.device):
                raise TypeError(f"CarrierPlan: slot {i}'s delta is {e.delta.dtype} on {e.delta.device}, "
                                f"the plan runs {dtype} on {self.device}")
        # without the extension (a build without _C) every call takes the registered op's torch path
        self._cpu = self.device.type == "cpu" and _backend.native_available()
        self._code = _native.DTYPE[dtype]
        wide = dtype in (torch.float32, torch.float64)
        self._fused_max = FUSED_MAX_TOKENS if wide or (self._cpu and _native_16bit_gemm()) else math.inf
        if self._cpu and not _native.lib().carrier_check_cpu(_native.ptr(table.views), len(table),
                                                              self.out_features, self.in_features):
            raise ValueError("CarrierPlan: the native check refused the carriers' indices (sorted, unique, "
                             "in range); build the plan from checked (delta, rows, cols)")
        # LCDD_BACKEND is read here, once (an environment lookup per call costs microseconds);
        # use_backend(...) / set_backend(...) are followed per call
        env = os.environ.get("LCDD_BACKEND", "").strip().lower()
        self._env = None if env in ("", "auto") else env
        self._env_native = self._env in _NATIVE
        self._views = _native.ptr(table.views)
        self._wshape, self._bshape = torch.Size((self.out_features, self.in_features)), torch.Size((self.out_features,))
        self._slots = len(table)

    def __len__(self) -> int:
        return self._slots

    def __repr__(self) -> str:
        used = sum(e is not None for e in self.table.entries)
        return (f"CarrierPlan(({self.out_features}, {self.in_features}), slots={self._slots}, carriers={used}, "
                f"{self.dtype}, {self.device})")

    def __call__(self, x: torch.Tensor, base_weight: torch.Tensor, bias: torch.Tensor | None = None,
                 slot_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``y_t = x_t·Bᵀ + b`` plus slot ``slot_ids[t]``'s carrier rows.

        Args:
            x: (..., K) activations in the plan's dtype, on its device; T = x.numel() / K tokens.
            base_weight: (N, K) contiguous base weight B (the model's; not copied).
            bias: (N,) or None.
            slot_ids: (T,) int32 (int64 is converted per call) slot per token, row-major over x's
                leading dimensions; −1, or any id outside ``[0, len(plan))``, means the base
                alone for that token. None: slot 0 on every token.

        Returns:
            (..., N) in x's dtype. Differentiable in x (through the registered op) when autograd
            records; base weight, bias and deltas are constants.
        """
        # autograd (x's gradient, or a clear refusal of weights that want one) and tracing go
        # through the registered op; everything else here is attribute reads (each costs ~0.1-0.4 µs
        # on an idle core: this is the path a serving loop calls per projection and token)
        if (self._cpu and x.is_cpu and x.dtype is self.dtype and base_weight.dtype is self.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or base_weight.requires_grad
                                                      or (bias is not None and bias.requires_grad)))
                and not (_any_autocast() and torch.is_autocast_enabled("cpu"))
                and not torch.compiler.is_compiling() and self._native_requested()):
            return self._cpu_call(x, base_weight, bias, slot_ids)
        return self._op_call(x, base_weight, bias, slot_ids, self.out_features, self.in_features)

    def add_(self, out: torch.Tensor, x: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """``out[t, rows_c] += x[t, cols_c]·Δ_cᵀ`` with ``c = slot_ids[t]``: the carriers alone,
        added in place, for an engine that computed the base projection itself (vLLM's CPU
        build keeps the base weight only in a prepacked form, so ``__call__`` cannot run there).

        Args:
            out: (T, N) base output in the plan's dtype, updated in place.
            x: (T, K) activations.
            slot_ids: (T,) int32 slot per token; an id outside ``[0, len(plan))`` adds nothing.

        Returns:
            ``out``. No autograd: this is an inference path.
        """
        n, k = self.out_features, self.in_features
        t = x.shape[0]
        if out.dim() != 2 or x.dim() != 2 or out.shape != (t, n) or x.shape[1] != k or slot_ids.shape != (t,):
            raise ValueError(f"CarrierPlan.add_: planned for a ({n}, {k}) projection; out must be (T, {n}), x "
                             f"(T, {k}) and slot_ids (T,), got {tuple(out.shape)}, {tuple(x.shape)} and "
                             f"{tuple(slot_ids.shape)}")
        if out.dtype is not self.dtype or x.dtype is not self.dtype or slot_ids.dtype is not torch.int32:
            raise TypeError(f"CarrierPlan.add_: out and x must be {self.dtype} and slot_ids int32, got "
                            f"{out.dtype}, {x.dtype} and {slot_ids.dtype}")
        if not (x.stride(-1) == 1 and x.stride(0) >= k):  # rows K apart, even a single one
            x = x.clone(memory_format=torch.contiguous_format)
        if not slot_ids.is_contiguous():
            slot_ids = slot_ids.contiguous()
        if out.device != x.device or slot_ids.device != x.device:
            raise ValueError(f"CarrierPlan.add_: out, x and slot_ids must be on one device, got {out.device}, "
                             f"{x.device} and {slot_ids.device}")
        if self._cpu and x.is_cpu and out.is_contiguous() and self._native_requested():
            _native.lib().carrier_add_prepared_cpu(x.data_ptr(), x.stride(0), out.data_ptr(), t, n, k, self._code,
                                                   self._views, self._slots, slot_ids.data_ptr())
            return out
        table = self.table
        if (out.is_cuda and out.is_contiguous() and _backend.triton_available()
                and _select("bank_linear", x, t, None) in ("cuda", "triton")):
            from . import carrier_triton
            from .carrier import route

            tok, seg = route(ids_or_base(slot_ids, self._slots), len(table), t, x.device)
            carrier_triton.carrier_add_(out, x, table.views, tok, seg, table.max_rows)
            return out
        from .carrier import _torch_add_

        _torch_add_(out, x, table.deltas, table.rows, table.cols, ids_or_base(slot_ids, self._slots))
        return out

    def _native_requested(self) -> bool:
        """Whether the backend in force (``use_backend`` in this thread, ``set_backend``, then
        ``LCDD_BACKEND``) lets the native library run; the thread-local lookup only while some
        ``use_backend`` context is open (a microsecond per call otherwise)."""
        if not (_backend._contexts or _backend._global_override):
            return self._env_native
        return (getattr(_backend._state, "name", None) or _backend._global_override or self._env) in _NATIVE

    def _shapes(self, x, base_weight, bias, ids, t, n, k) -> None:
        if base_weight.shape != (n, k) or x.shape[-1] != k:
            raise ValueError(f"CarrierPlan: planned for a ({n}, {k}) projection, got base_weight "
                             f"{tuple(base_weight.shape)} and x {tuple(x.shape)}; x must be (..., {k})")
        if bias is not None and bias.shape != (n,):
            raise ValueError(f"CarrierPlan: bias must have shape ({n},), got {tuple(bias.shape)}")
        if ids is not None and ids.shape != (t,):
            raise ValueError(f"CarrierPlan: slot_ids must have shape ({t},) (one per token of x), "
                             f"got {tuple(ids.shape)}")

    def _cpu_call(self, x, base_weight, bias, ids):
        n, k = self.out_features, self.in_features
        shape = x.shape  # one torch.Size, read below instead of x.shape per use
        nd = len(shape)
        t = shape[0] if nd == 2 else math.prod(shape[:-1])
        if not (shape[-1] == k and base_weight.shape == self._wshape and base_weight.is_cpu
                and base_weight.is_contiguous()):
            self._refuse(x, base_weight, bias, ids, t)
        if bias is not None and not (bias.shape == self._bshape and bias.is_cpu and bias.dtype is self.dtype
                                     and bias.is_contiguous()):
            self._refuse(x, base_weight, bias, ids, t)
        ids_ptr = 0
        if ids is not None:
            if not (ids.dtype is torch.int32 and ids.is_cpu and ids.shape == (t,) and ids.is_contiguous()):
                ids = self._cpu_ids(x, base_weight, bias, ids, t)
            ids_ptr = ids.data_ptr()
        # rows K apart: a contiguous x as it is (whatever the stride of a single row says), a 2-D
        # x with row padding by its stride, anything else (expanded, transposed) copied once
        if x.is_contiguous():
            x2, xs = x, k
        elif nd == 2 and x.stride(-1) == 1 and x.stride(0) >= k:
            x2, xs = x, x.stride(0)
        else:
            x2, xs = x.reshape(t, k).contiguous(), k
        n_views = self._slots if ids is not None or self._slots < 1 else 1  # no ids: slot 0 on every token
        # the output in its final shape (a view after the fact costs a microsecond)
        y = x.new_empty(t, n) if nd == 2 else x.new_empty(shape[0], shape[1], n) if nd == 3 else \
            x.new_empty((*shape[:-1], n))
        lib = _native.lib()
        if t <= self._fused_max:
            lib.carrier_linear_prepared_cpu(x2.data_ptr(), xs, base_weight.data_ptr(),
                                            0 if bias is None else bias.data_ptr(), y.data_ptr(), t, n, k,
                                            self._code, self._views, n_views, ids_ptr)
            return y
        xm, ym = x2.reshape(t, k) if xs == k else x2, y.view(t, n)
        if bias is None:
            torch.mm(xm, base_weight.t(), out=ym)
        else:
            torch.addmm(bias, xm, base_weight.t(), out=ym)
        lib.carrier_add_prepared_cpu(xm.data_ptr(), xs, ym.data_ptr(), t, n, k, self._code, self._views, n_views,
                                     ids_ptr)
        return y

    def _refuse(self, x, base_weight, bias, ids, t) -> None:
        """Raise the error that names what a CPU call got wrong."""
        self._shapes(x, base_weight, bias, ids, t, self.out_features, self.in_features)
        if not base_weight.is_cpu or (bias is not None and (not bias.is_cpu or bias.dtype is not self.dtype)):
            raise ValueError(f"CarrierPlan: base_weight and bias must be {self.dtype} CPU tensors like x")
        raise ValueError("CarrierPlan: base_weight and bias must be contiguous (the native call reads raw "
                         "rows); pass .contiguous() once, not per call")

    def _cpu_ids(self, x, base_weight, bias, ids, t) -> torch.Tensor:
        """``ids`` as the native call reads them (contiguous int32 on the CPU), or the error."""
        if ids.shape != (t,):
            self._shapes(x, base_weight, bias, ids, t, self.out_features, self.in_features)
        if not ids.is_cpu:
            raise ValueError(f"CarrierPlan: slot_ids is on {ids.device}, x on the CPU")
        if ids.dtype is not torch.int32:
            if ids.dtype is not torch.int64:
                raise TypeError(f"CarrierPlan: slot_ids must be int32 (or int64) ids, got {ids.dtype}")
            ids = ids_or_base(ids, self._slots).to(torch.int32)  # an int64 id could wrap into range
        return ids.contiguous()

    def _op_call(self, x, base_weight, bias, ids, n, k):
        from .carrier import _autocast, _prepare

        x, base_weight, bias = _autocast(x, base_weight, bias)
        op = "CarrierPlan"
        if x.dtype != self.dtype or base_weight.dtype != self.dtype:
            raise TypeError(f"{op}: the plan holds {self.dtype} deltas but x is {x.dtype} and base_weight "
                            f"{base_weight.dtype}; build the plan with dtype={x.dtype}")
        if x.device != self.device or base_weight.device != self.device:
            raise ValueError(f"{op}: the plan lives on {self.device} but x is on {x.device} and base_weight on "
                             f"{base_weight.device}")
        t = math.prod(x.shape[:-1])
        self._shapes(x, base_weight, bias, ids, t, n, k)
        name = _select("bank_linear", x, t, None)
        table = self.table
        if name == "reference":
            from .carrier import bank_linear_ref

            items = [None if e is None else (e.delta, e.rows, e.cols) for e in table.entries]
            if ids is None:
                ids = torch.zeros(t, dtype=torch.int32, device=x.device)
            return bank_linear_ref(x, base_weight, items, ids, bias)
        if ids is not None:
            if ids.device != x.device:
                raise ValueError(f"{op}: slot_ids is on {ids.device}, x on {x.device}")
            if name in ("cpp", "cuda") or ids.dtype != torch.int32:
                ids = ids_or_base(ids, self._slots)  # on the device, no host sync
            ids = (ids if ids.dtype == torch.int32 else ids.to(torch.int32)).contiguous()
        _prepare(op, name, base_weight, bias, iter(table.deltas))
        return torch.ops.lcdd.bank_linear(x, base_weight, bias, ids, table.views, table.deltas, table.rows,
                                          table.cols, table.max_rows, name)

