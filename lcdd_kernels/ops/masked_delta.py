"""Masked-delta projection (SPEC §1): ``y = x·W_effᵀ + b``, ``W_eff = B + (r cᵀ) ⊙ (W − B)``.

Layout of this module, in order: the literal references, the lean PyTorch backend (forward and
backward helpers that rebuild ``W_eff`` in row blocks instead of saving it), the registered ops
``torch.ops.lcdd.masked_delta_{linear,swiglu}`` with their backward ops (one opaque node per
projection for torch.compile; the torch and Triton backends behind them), argument checks, and the
public functions that dispatch between ``triton`` / ``torch`` / ``reference``.

Memory contract (what makes LCDD cost one frozen weight copy over plain SFT): no backend saves
``W_eff``, ``r cᵀ`` or ``W − B`` for backward; they are rebuilt from the saved inputs. The torch
backend also bounds its transient weight-sized buffers to ~1/16 of a weight by working in row
blocks, so that even the peak during forward/backward stays near one copy over ``dense``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend, _checks
from ._blocks import flat, row_blocks

__all__ = [
    "masked_delta_linear",
    "masked_delta_swiglu",
    "masked_delta_linear_ref",
    "masked_delta_swiglu_ref",
    "effective_weight",
]

# ---------------------------------------------------------------------------------------------
# References: SPEC §1 written literally. Autograd provides every gradient.
# ---------------------------------------------------------------------------------------------


def effective_weight(weight, base_weight, row_mask, col_mask):
    """``W_eff = B + (r cᵀ) ⊙ (W − B)`` as a dense tensor (for references, merging and export)."""
    return base_weight + torch.outer(row_mask, col_mask) * (weight - base_weight)


def masked_delta_linear_ref(x, weight, base_weight, row_mask, col_mask, bias=None):
    y = x @ effective_weight(weight, base_weight, row_mask, col_mask).transpose(0, 1)
    return y if bias is None else y + bias


def masked_delta_swiglu_ref(x, gate_weight, gate_base, up_weight, up_base, hidden_mask, read_mask):
    g = masked_delta_linear_ref(x, gate_weight, gate_base, hidden_mask, read_mask)
    u = masked_delta_linear_ref(x, up_weight, up_base, hidden_mask, read_mask)
    return F.silu(g) * u


# ---------------------------------------------------------------------------------------------
# Torch backend: same math, lean memory. W_eff exists only one row block at a time.
# ---------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, never below the inputs' own (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _weff_block(weight, base, r, c, rows=slice(None), cols=slice(None), out=None):
    """W_eff[rows, cols] in the weight's dtype, as one fresh block (or written into ``out``)."""
    w, b = weight[rows, cols], base[rows, cols]
    blk = torch.sub(w, b, out=out)
    blk.mul_(r[rows, None]).mul_(c[None, cols])
    return blk.add_(b)


def _forward_into(y2, x2, weight, base, r, c):
    for s, e in row_blocks(*weight.shape):
        torch.mm(x2, _weff_block(weight, base, r, c, rows=slice(s, e)).t(), out=y2[:, s:e])


def _dx_into(dx, g2, pairs, r, c):
    """``dx = Σ_i G_i · W_eff_i`` for projections sharing masks, ``g2`` (T, P·N) holding the G_i
    side by side. Column blocks of K: every block of dx is one GEMM over all P·N rows, rounded
    once (summing per-row-block partial products would round fp16/bf16 once per block)."""
    n, k = pairs[0][0].shape
    for s, e in row_blocks(k, len(pairs) * n):  # the same blocking, over columns
        blk = g2.new_empty(len(pairs) * n, e - s)
        for i, (w, b) in enumerate(pairs):
            _weff_block(w, b, r, c, cols=slice(s, e), out=blk[i * n:(i + 1) * n])
        torch.mm(g2, blk, out=dx[:, s:e])


def _param_grads(g2, x2, weight, base, r, c, need):
    """One projection's (dW, dr, dc) in row blocks; ``need`` = (dW, dr, dc) flags, None when unneeded.

    ``P = Gᵀ X`` is written straight into dW's storage block by block; the mask reductions use
    ``Q = P ⊙ (W − B)`` in at least fp32, one block at a time.
    """
    need_dw, need_dr, need_dc = need
    n, k = weight.shape
    acc = _acc_dtype(weight.dtype)
    dw = torch.empty_like(weight) if need_dw else None
    dr = torch.empty(n, dtype=acc, device=weight.device) if need_dr else None
    dc = torch.zeros(k, dtype=acc, device=weight.device) if need_dc else None
    if not (need_dw or need_dr or need_dc):
        return dw, dr, dc
    for s, e in row_blocks(n, k):
        gb = g2[:, s:e]
        p = torch.mm(gb.t(), x2, out=dw[s:e]) if need_dw else gb.t() @ x2
        if need_dr or need_dc:
            q = (weight[s:e].to(acc) - base[s:e].to(acc)).mul_(p)
            if need_dr:
                dr[s:e] = q @ c.to(acc)
            if need_dc:
                dc += q.t() @ r[s:e].to(acc)
            del q
        if need_dw:
            p.mul_(r[s:e, None]).mul_(c[None, :])
    return dw, dr, dc


#: Rows of fp32 temporaries per chunk in the SwiGLU gradient (bounds them to ~4 MiB each).
_SWIGLU_CHUNK_ELEMS = 1 << 20


def _swiglu_grads_into(dgu, dh, gu):
    """``dgu[:, 0], dgu[:, 1] = ∂/∂g, ∂/∂u`` of ``silu(g) ⊙ u`` with ``gu`` (T, 2, F) holding g, u.

    Computed in (at least) fp32, in row chunks; ``dgu`` may be ``gu`` itself (each chunk is read
    whole before it is written), which is how backward avoids a second (T, 2, F) buffer.
    """
    t, _, f = gu.shape
    acc = _acc_dtype(gu.dtype)
    step = max(1, _SWIGLU_CHUNK_ELEMS // max(f, 1))
    for s in range(0, t, step):
        e = min(t, s + step)
        g, u, d = gu[s:e, 0].to(acc), gu[s:e, 1].to(acc), dh[s:e].to(acc)
        sg = torch.sigmoid(g)
        du = d * g * sg
        dg = d * u * sg * (1 + g * (1 - sg))
        dgu[s:e, 0] = dg
        dgu[s:e, 1] = du


def _shared_mask_grads(gate, up, r, c, need_r, need_c):
    """The SwiGLU's (dr, dc) from the gate's and up's (dW, dr, dc): the two projections share the
    masks, so their mask gradients add (in the accumulation dtype, rounded once to the masks')."""
    (_, drg, dcg), (_, dru, dcu) = gate, up
    return (drg + dru).to(r.dtype) if need_r else None, (dcg + dcu).to(c.dtype) if need_c else None


def _graph_is_kept() -> bool:
    """True when this backward runs with retain_graph (saved tensors must then stay intact).
    Unknown (an older torch without the query) counts as kept: never overwrite by guess."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


# ---------------------------------------------------------------------------------------------
# Registered ops (torch.ops.lcdd.*). The public functions below validate their arguments, apply
# autocast and pick the backend, then call these; the ops themselves only compute, so that
# torch.compile sees one opaque node per projection (its fake implementation gives the shapes)
# and every backend's gradient comes from the same registered backward. Each op has one
# implementation for both devices (device_types="cpu", "cuda"): the ``backend`` argument, not the
# device, picks the code, and the dispatcher still refuses any other device.
# ---------------------------------------------------------------------------------------------


def _triton():
    from . import masked_delta_triton

    return masked_delta_triton


def _linear_forward(x, weight, base, r, c, bias, backend):
    k, n = x.shape[-1], weight.shape[0]
    x2 = flat(x, k)
    if backend == "triton":
        t = _triton()
        design = t.choose_design(x2.shape[0])
        y2, _ = t._IMPL[design].forward(x2, [(weight.contiguous(), base.contiguous())], r, c, bias)
    else:
        y2 = x2.new_empty(x2.shape[0], n)
        _forward_into(y2, x2, weight, base, r, c)
        if bias is not None:
            y2.add_(bias)
    return y2.view(*x.shape[:-1], n)


def _empty_grad(t):
    return t.new_empty(0)


def _linear_backward(gy, x, weight, base, r, c, need, backend):
    nx, nw, nr, nc = need
    k, n = x.shape[-1], weight.shape[0]
    x2 = flat(x, k)
    g2 = flat(gy, n).to(x.dtype)
    if backend == "triton":
        t = _triton()
        impl = t._IMPL[t.choose_design(x2.shape[0])]
        w, b = weight.contiguous(), base.contiguous()
        dx = impl.dx(g2[:, None], [(w, b)], r, c) if nx else None
        dw, dr, dc = impl.dw(g2, x2, w, b, r, c, nw, nr, nc)
    else:
        dx = None
        if nx:
            dx = x2.new_empty(x2.shape)
            _dx_into(dx, g2, [(weight, base)], r, c)
        dw, dr, dc = _param_grads(g2, x2, weight, base, r, c, (nw, nr, nc))
    return (dx.view(x.shape) if nx else _empty_grad(x), dw if nw else _empty_grad(weight),
            dr.to(r.dtype) if nr else _empty_grad(r), dc.to(c.dtype) if nc else _empty_grad(c))


@torch.library.custom_op("lcdd::masked_delta_linear", mutates_args=(), device_types=("cpu", "cuda"))
def _op_linear(x: torch.Tensor, weight: torch.Tensor, base: torch.Tensor, r: torch.Tensor,
               c: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """r, c in x's dtype. One kernel for both devices: ``backend`` (chosen by the public wrapper)
    says which code runs, on CUDA the Triton kernels, on the CPU the torch backend (or Triton
    under the interpreter, for tests)."""
    return _linear_forward(x, weight, base, r, c, bias, backend)


@_op_linear.register_fake
def _(x, weight, base, r, c, bias, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("lcdd::masked_delta_linear_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _op_linear_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, base: torch.Tensor,
                        r: torch.Tensor, c: torch.Tensor, need: list[bool], backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, dr, dc) of SPEC §1; ``need`` = which of them to compute (the others are empty)."""
    return _linear_backward(gy, x, weight, base, r, c, need, backend)


@_op_linear_backward.register_fake
def _(gy, x, weight, base, r, c, need, backend):
    return tuple(torch.empty_like(t) if want else t.new_empty(0) for t, want in zip((x, weight, r, c), need))


def _linear_setup(ctx, inputs, output):
    x, weight, base, r, c, bias, backend = inputs
    ctx.save_for_backward(x, weight, base, r, c)
    ctx.backend, ctx.has_bias = backend, bias is not None


def _linear_grad(ctx, gy):
    x, weight, base, r, c = ctx.saved_tensors
    nx, nw, _, nr, nc, nb, _ = ctx.needs_input_grad
    dx, dw, dr, dc = torch.ops.lcdd.masked_delta_linear_backward(gy, x, weight, base, r, c, [nx, nw, nr, nc],
                                                                 ctx.backend)
    db = flat(gy, weight.shape[0]).to(x.dtype).sum(0) if (nb and ctx.has_bias) else None
    return (dx if nx else None, dw if nw else None, None, dr if nr else None, dc if nc else None, db, None)


_op_linear.register_autograd(_linear_grad, setup_context=_linear_setup)


def _swiglu_forward(x, wg, bg, wu, bu, r, c, backend):
    k, f = x.shape[-1], wg.shape[0]
    x2 = flat(x, k)
    if backend == "triton":
        t = _triton()
        pairs = [(wg.contiguous(), bg.contiguous()), (wu.contiguous(), bu.contiguous())]
        h, gu = t._IMPL[t.choose_design(x2.shape[0])].forward(x2, pairs, r, c, None)
    else:
        gu = x2.new_empty(x2.shape[0], 2, f)
        _forward_into(gu[:, 0], x2, wg, bg, r, c)
        _forward_into(gu[:, 1], x2, wu, bu, r, c)
        h = F.silu(gu[:, 0]) * gu[:, 1]
    return h.view(*x.shape[:-1], f), gu


def _swiglu_backward(dh, x, wg, bg, wu, bu, r, c, gu, need, overwrite, backend):
    nx, nwg, nwu, nr, nc = need
    k, f = x.shape[-1], wg.shape[0]
    x2 = flat(x, k)
    if backend == "triton":
        t = _triton()
        impl = t._IMPL[t.choose_design(x2.shape[0])]
        pairs = [(wg.contiguous(), bg.contiguous()), (wu.contiguous(), bu.contiguous())]
        dgu = t._swiglu_backward(flat(dh, f), gu, gu if overwrite else torch.empty_like(gu))
        dx = impl.dx(dgu, pairs, r, c) if nx else None
        gate = impl.dw(dgu[:, 0], x2, *pairs[0], r, c, nwg, nr, nc)
        up = impl.dw(dgu[:, 1], x2, *pairs[1], r, c, nwu, nr, nc)
    else:
        dgu = gu if overwrite else torch.empty_like(gu)
        _swiglu_grads_into(dgu, flat(dh, f), gu)
        dx = None
        if nx:
            dx = x2.new_empty(x2.shape)
            _dx_into(dx, dgu.view(dgu.shape[0], 2 * f), [(wg, bg), (wu, bu)], r, c)
        gate = _param_grads(dgu[:, 0], x2, wg, bg, r, c, (nwg, nr, nc))
        up = _param_grads(dgu[:, 1], x2, wu, bu, r, c, (nwu, nr, nc))
    (dwg, _, _), (dwu, _, _) = gate, up
    dr, dc = _shared_mask_grads(gate, up, r, c, nr, nc)
    return (dx.view(x.shape) if nx else _empty_grad(x), dwg if nwg else _empty_grad(wg),
            dwu if nwu else _empty_grad(wu), dr if nr else _empty_grad(r), dc if nc else _empty_grad(c))


@torch.library.custom_op("lcdd::masked_delta_swiglu", mutates_args=(), device_types=("cpu", "cuda"))
def _op_swiglu(x: torch.Tensor, gate_weight: torch.Tensor, gate_base: torch.Tensor, up_weight: torch.Tensor,
               up_base: torch.Tensor, r: torch.Tensor, c: torch.Tensor, backend: str,
               gu_scratch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, gu): h = silu(g) ⊙ u (..., F) and the pre-activations gu (T, 2, F) that backward reads
    (a second output so that it is saved, not recomputed; it is not differentiable).
    ``gu_scratch=True`` lets an eager backward write its gradients over gu (one (T, 2, F) buffer
    fewer at the MLP's backward peak): for callers that drop gu, as masked_delta_swiglu does."""
    return _swiglu_forward(x, gate_weight, gate_base, up_weight, up_base, r, c, backend)


@_op_swiglu.register_fake
def _(x, gate_weight, gate_base, up_weight, up_base, r, c, backend, gu_scratch):
    f = gate_weight.shape[0]
    t = math.prod(x.shape[:-1])
    return x.new_empty(*x.shape[:-1], f), x.new_empty(t, 2, f)


@torch.library.custom_op("lcdd::masked_delta_swiglu_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _op_swiglu_backward(dh: torch.Tensor, x: torch.Tensor, gate_weight: torch.Tensor, gate_base: torch.Tensor,
                        up_weight: torch.Tensor, up_base: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
                        gu: torch.Tensor, need: list[bool], backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dWg, dWu, dr, dc); ``need`` says which (the others are empty)."""
    return _swiglu_backward(dh, x, gate_weight, gate_base, up_weight, up_base, r, c, gu, need, False, backend)


@torch.library.custom_op("lcdd::masked_delta_swiglu_backward_", mutates_args=("gu",), device_types=("cpu", "cuda"))
def _op_swiglu_backward_(dh: torch.Tensor, x: torch.Tensor, gate_weight: torch.Tensor, gate_base: torch.Tensor,
                         up_weight: torch.Tensor, up_base: torch.Tensor, r: torch.Tensor, c: torch.Tensor,
                         gu: torch.Tensor, need: list[bool], backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same, writing ∂g, ∂u over ``gu`` (one (T, 2, F) buffer fewer at the MLP's backward
    peak; eager backward uses it when the graph is not retained)."""
    return _swiglu_backward(dh, x, gate_weight, gate_base, up_weight, up_base, r, c, gu, need, True, backend)


def _swiglu_backward_fake(dh, x, gate_weight, gate_base, up_weight, up_base, r, c, gu, need, backend):
    return tuple(torch.empty_like(t) if want else t.new_empty(0)
                 for t, want in zip((x, gate_weight, up_weight, r, c), need))


_op_swiglu_backward.register_fake(_swiglu_backward_fake)
_op_swiglu_backward_.register_fake(_swiglu_backward_fake)


def _swiglu_setup(ctx, inputs, output):
    x, wg, bg, wu, bu, r, c, backend, gu_scratch = inputs
    ctx.save_for_backward(x, wg, bg, wu, bu, r, c, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.backend, ctx.gu_scratch = backend, gu_scratch


def _swiglu_grad(ctx, dh, _dgu):
    x, wg, bg, wu, bu, r, c, gu = ctx.saved_tensors
    nx, nwg, _, nwu, _, nr, nc, _, _ = ctx.needs_input_grad
    # Eagerly the saved buffer is reused unless retain_graph asked to keep it: one (T, 2, F)
    # buffer fewer at the MLP's backward peak (measured: +1.37 -> +1.12 weight copies for Qwen3's
    # SwiGLU, T=256). Never while a backward is traced (torch.compile, AOT autograd: gu is a fake
    # or functional tensor then): the compiled graph owns its buffers and functionalisation would
    # copy gu anyway.
    overwrite = (ctx.gu_scratch and type(gu) is torch.Tensor and not torch.compiler.is_compiling()
                 and not _graph_is_kept())
    op = torch.ops.lcdd.masked_delta_swiglu_backward_ if overwrite else torch.ops.lcdd.masked_delta_swiglu_backward
    dx, dwg, dwu, dr, dc = op(dh, x, wg, bg, wu, bu, r, c, gu, [nx, nwg, nwu, nr, nc], ctx.backend)
    return (dx if nx else None, dwg if nwg else None, None, dwu if nwu else None, None,
            dr if nr else None, dc if nc else None, None, None)


_op_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# ---------------------------------------------------------------------------------------------
# Checks and dispatch
# ---------------------------------------------------------------------------------------------

_IMPLEMENTED = ("triton", "torch", "reference")
_AUTO = ("triton", "torch")


def _autocast(*ts):
    """Apply the ambient autocast dtype to the float operands, as nn.Linear would get it.

    Runs before the checks (under autocast x arrives in the autocast dtype while the weights are
    fp32); anything that is not a floating tensor is passed through for the checks to name."""
    tensors = [t for t in ts if isinstance(t, torch.Tensor)]
    if not tensors:
        return ts
    dev = tensors[0].device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts)
    return ts


def _check_projection(op, x, pairs, row_mask, col_mask, bias=None, row_name="row_mask", col_name="col_mask"):
    """Shared validation. ``pairs`` = [(weight_name, weight, base_name, base), ...] of one shape."""
    _checks.floating(op, "x", x)
    _checks.min_ndim(op, "x", x, 1, "(..., K)")
    w_name, w0 = pairs[0][0], pairs[0][1]
    for wn, w, bn, b in pairs:
        _checks.floating(op, wn, w)
        _checks.floating(op, bn, b)
        _checks.ndim(op, wn, w, 2, "(N, K)")
        _checks.shape(op, wn, w, w0.shape, f"(the shape of {w_name})")
        _checks.shape(op, bn, b, w.shape, f"(the shape of {wn})")
        _checks.no_grad_required(op, bn, b, "the base weight is frozen and never gets a gradient")
        _checks.same_dtype(op, "x", x, **{wn: w, bn: b})
        _checks.same_device(op, "x", x, **{wn: w, bn: b})
    _checks.in_features(op, "x", x, w_name, w0)
    n, k = w0.shape
    for name, m, length, what in ((row_name, row_mask, n, "N, one per output row"),
                                  (col_name, col_mask, k, "K, one per input column")):
        _checks.floating(op, name, m)
        _checks.shape(op, name, m, (length,), f"(length {what})")
        _checks.same_device(op, "x", x, **{name: m})
    if bias is not None:
        _checks.floating(op, "bias", bias)
        _checks.shape(op, "bias", bias, (n,), "(one per output row)")
        _checks.same_dtype(op, "x", x, bias=bias)
        _checks.same_device(op, "x", x, bias=bias)


def _pick(op, device, backend, dtype=None):
    name = _backend.select(op, device, _IMPLEMENTED, _AUTO, backend)
    if name == "triton" and dtype == torch.float64:
        # The Triton kernels form W_eff and accumulate in fp32: float64 would come back with fp32
        # accuracy or worse. An explicit request is refused; the automatic choice takes torch.
        explicit = (backend is not None and backend.strip().lower() != "auto") or _backend.requested() is not None
        if explicit:
            raise ValueError(f"{op}: backend 'triton' computes float32, float16 and bfloat16 (it accumulates "
                             f"in fp32), got float64; use backend='torch' or 'reference' for float64, "
                             f"or cast the inputs with .float()")
        return "torch"
    return name


def masked_delta_linear(x, weight, base_weight, row_mask, col_mask, bias=None, *, backend=None):
    """Masked-delta projection of SPEC §1.

    Args:
        x: (..., K) input.
        weight: (N, K) trainable weight W (initialised to the SFT weight).
        base_weight: (N, K) frozen base weight B; must not require grad.
        row_mask: (N,) output-channel mask r (any real values; binary during LCDD).
        col_mask: (K,) input-channel mask c.
        bias: (N,) or None.
        backend: "triton", "torch" or "reference"; default from ``LCDD_BACKEND`` / device.

    Returns:
        (..., N): ``x·(B + (r cᵀ) ⊙ (W − B))ᵀ + b``, differentiable in x, weight, both masks
        and bias. Masks may be any floating dtype; they are applied in x's dtype.
    """
    op = "masked_delta_linear"
    x, weight, base_weight, bias = _autocast(x, weight, base_weight, bias)
    _check_projection(op, x, [("weight", weight, "base_weight", base_weight)], row_mask, col_mask, bias)
    r, c = row_mask.to(x.dtype), col_mask.to(x.dtype)
    name = _pick(op, x.device, backend, x.dtype)
    if name == "reference":
        return masked_delta_linear_ref(x, weight, base_weight, r, c, bias)
    return torch.ops.lcdd.masked_delta_linear(x, weight, base_weight, r, c, bias, name)


def masked_delta_swiglu(x, gate_weight, gate_base, up_weight, up_base, hidden_mask, read_mask, *, backend=None):
    """Fused masked-delta SwiGLU: ``silu(x·Wg_effᵀ) ⊙ (x·Wu_effᵀ)`` (SPEC §1 for each projection).

    Args:
        x: (..., K) input; gate_weight / gate_base / up_weight / up_base: (F, K).
        hidden_mask: (F,) row mask shared by gate and up (``ffn_hidden``).
        read_mask: (K,) column mask shared by gate and up (``ffn_read``).

    Returns:
        (..., F), differentiable in x, both weights and both masks. Gate and up pre-activations are
        computed once and kept once for backward.
    """
    op = "masked_delta_swiglu"
    x, gate_weight, gate_base, up_weight, up_base = _autocast(x, gate_weight, gate_base, up_weight, up_base)
    _check_projection(
        op, x,
        [("gate_weight", gate_weight, "gate_base", gate_base), ("up_weight", up_weight, "up_base", up_base)],
        hidden_mask, read_mask, row_name="hidden_mask", col_name="read_mask",
    )
    r, c = hidden_mask.to(x.dtype), read_mask.to(x.dtype)
    name = _pick(op, x.device, backend, x.dtype)
    if name == "reference":
        return masked_delta_swiglu_ref(x, gate_weight, gate_base, up_weight, up_base, r, c)
    return torch.ops.lcdd.masked_delta_swiglu(x, gate_weight, gate_base, up_weight, up_base, r, c, name, True)[0]
