"""Triton kernel of the carrier part (see carrier.py), for prefill-sized batches. Imported lazily:
TRITON_INTERPRET must be set before the kernel below is defined.

Design: the base GEMM ``y = x·Bᵀ + b`` stays with the vendor library (cuBLAS through PyTorch; on
prefill shapes it is the floor this op is measured against), then this kernel adds the carriers
in place: per carrier slot, per tile of that slot's tokens and of its delta rows, it gathers
``x[t, cols]`` on load, multiplies by the compact ``Δ`` tile and read-modify-writes ``y[t, rows]``
in its epilogue. Work and bytes scale with |rows|·|cols| (the fraction f of a dense weight), no
full-size temporary is made, and one launch serves every carrier in the batch (slots whose
tokens or rows a tile does not cover exit at once). The alternative, a fused GEMM whose epilogue
adds carrier rows, would need Δ expanded to the tile's dense (BK × BN) shape (work ∝ the
column fraction, not f) or a register scatter Triton does not have.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DOT_IEEE, _DOT_LOWP, _DOT_FP64 = 0, 1, 2


@triton.jit
def _carrier_add_kernel(x_ptr, y_ptr, views_ptr, tok_ptr, seg_ptr, sx, sy,
                        HAS_TOK: tl.constexpr, DOT: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # views_ptr: int64 (slots, 6) = lcdd_carrier_view (delta, rows, cols, row_slots, n_rows, n_cols).
    # Slot c's tokens are tok[seg[c]:seg[c+1]] (or positions seg[c]..seg[c+1] when HAS_TOK is off).
    c = tl.program_id(0)
    s0 = tl.load(seg_ptr + c)
    s1 = tl.load(seg_ptr + c + 1)
    m0 = s0 + tl.program_id(1) * BM
    n_rows = tl.load(views_ptr + c * 6 + 4)
    n_cols = tl.load(views_ptr + c * 6 + 5)
    j0 = tl.program_id(2) * BN
    if (m0 < s1) & (j0 < n_rows) & (n_cols > 0):
        delta = tl.load(views_ptr + c * 6).to(tl.pointer_type(x_ptr.dtype.element_ty))
        rows = tl.load(views_ptr + c * 6 + 1).to(tl.pointer_type(tl.int32))
        cols = tl.load(views_ptr + c * 6 + 2).to(tl.pointer_type(tl.int32))
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < s1
        if HAS_TOK:
            t = tl.load(tok_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            t = offs_m.to(tl.int64)
        offs_j = j0 + tl.arange(0, BN)
        mask_j = offs_j < n_rows
        r = tl.load(rows + offs_j, mask=mask_j, other=0).to(tl.int64)
        if DOT == 2:
            acc = tl.zeros((BM, BN), dtype=tl.float64)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, n_cols, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < n_cols
            col = tl.load(cols + offs_k, mask=mask_k, other=0).to(tl.int64)
            a = tl.load(x_ptr + t[:, None] * sx + col[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(delta + offs_j[None, :].to(tl.int64) * n_cols + offs_k[:, None],
                        mask=mask_k[:, None] & mask_j[None, :], other=0.0)  # (BK, BN) tile of Δᵀ
            if DOT == 0:
                acc += tl.dot(a, b, input_precision="ieee")
            elif DOT == 1:
                acc += tl.dot(a, b)
            else:
                acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        ptrs = y_ptr + t[:, None] * sy + r[None, :]
        mask = mask_m[:, None] & mask_j[None, :]
        old = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (old.to(acc.dtype) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def carrier_add_(y: torch.Tensor, x: torch.Tensor, views: torch.Tensor, tok: torch.Tensor | None,
                 seg: torch.Tensor, max_rows: int) -> None:
    """``y[t, rows_c] += x[t, cols_c]·Δ_cᵀ`` in place for every slot c and its tokens.

    y: (T, N) with unit column stride; x: (T, K) with unit column stride; views: int64 (S, 6);
    tok: int32 (T,) token order grouped by slot, or None for the identity; seg: int32 (S + 1,)
    offsets into tok; max_rows: the largest |rows| in the table (sizes the grid).
    """
    n_tok, n_slots = x.shape[0], views.shape[0]
    if n_tok == 0 or n_slots == 0 or max_rows == 0:
        return
    dot = {torch.float32: _DOT_IEEE, torch.float64: _DOT_FP64}.get(x.dtype, _DOT_LOWP)
    bm = min(128, max(16, triton.next_power_of_2(n_tok)))
    # Register budget: both operand tiles are gathers, so besides the accumulator every thread
    # holds a 64-bit address per element of its share of the (BM, BK) x tile and the (BK, BN) Δ
    # tile. With BK = 64 / BN = 128 (the first tiles) 12 of 16 bf16 configs spilled on sm_90 and
    # sm_80 (56 B to 7 KB, lcdd check-kernels); 32-deep steps, 64 delta rows and 8 warps from
    # 64 tokens keep it to ~80 registers' worth. fp32 ("ieee": FMA, no tensor cores) steps by 16.
    bn = 64 if dot != _DOT_FP64 else 16
    bk = 32 if x.element_size() == 2 else 16
    if dot == _DOT_FP64:
        bm = min(bm, 32)
    elif dot == _DOT_IEEE:
        bm = min(bm, 64)  # fp32 FMA copies of a 128-token x tile spilled 8 B at 255 registers on sm_80
    grid = (n_slots, triton.cdiv(n_tok, bm), triton.cdiv(max_rows, bn))
    _carrier_add_kernel[grid](
        x, y, views, tok if tok is not None else seg, seg, x.stride(0), y.stride(0),
        HAS_TOK=tok is not None, DOT=dot, BM=bm, BN=bn, BK=bk,
        num_warps=8 if bm >= 64 and dot != _DOT_FP64 else 4,
    )
