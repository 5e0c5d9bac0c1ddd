"""Triton backend of the masked-delta projection (SPEC §1) and of its fused SwiGLU.

Called by :mod:`lcdd_kernels.ops.masked_delta` once it has validated the arguments, applied
autocast and cast the masks to x's dtype. Importing this module defines Triton kernels, so it is
imported lazily (``TRITON_INTERPRET`` must be set before, for CPU tensors).

Two designs, both complete (forward and every gradient), chosen per call by :func:`choose_design`:

* ``fused``: Triton GEMMs that form ``W_eff = B + (r cᵀ) ⊙ (W − B)`` tile by tile in registers as
  they load the weight operand (forward ``y = x W_effᵀ + b``, backward ``dx = G W_eff``), and a
  ``P = Gᵀ X`` kernel whose epilogue turns each P tile into ``dW = P ⊙ (r cᵀ)`` and per-tile partial
  sums of ``dr`` and ``dc`` (reduced afterwards in a fixed order: deterministic, no atomics). No
  weight-sized tensor exists besides the inputs and dW.
* ``split``: cuBLAS GEMMs (``torch.mm``) plus fused Triton element/reduction kernels: one pass
  writes ``W_eff`` one block at a time (≈1/16 of a weight, as the torch backend does), and one
  pass turns ``P = Gᵀ X`` (written by cuBLAS straight into dW's storage) into dW, dr and dc in
  place.

Dispatch (why): with few tokens a projection is bound by reading its weights. ``fused`` reads W
and B once per token tile and never writes W_eff, while ``split`` reads W and B, writes W_eff and
reads it back (about twice the weight traffic) and adds launches. Every token tile of ``fused``
re-forms W_eff, however, which costs CUDA-core work and weight re-reads in proportion to
T / BLOCK_M, while cuBLAS is the better GEMM at large sizes and ``split`` pays its O(N·K) pass
once, so many tokens favour ``split``. ``FUSED_MAX_TOKENS`` is the crossover.

All accumulation is fp32 (``tl.dot`` into an fp32 accumulator, mask-gradient sums in fp32) with
one rounding at the store, as cuBLAS does. Nothing weight-sized is saved for backward: the
registered ops save their inputs (and, for SwiGLU, the gate and up pre-activations in one
(T, 2, F) buffer) and rebuild W_eff where needed.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._blocks import row_blocks

__all__ = ["choose_design", "DESIGNS", "FUSED_MAX_TOKENS"]

DESIGNS = ("fused", "split")

#: Token count up to which ``fused`` is used (above it ``split``). PROVISIONAL: chosen from the
#: cost model in the module docstring without a GPU measurement; the GPU benchmark
#: (``LCDD_TRITON_DESIGN=fused|split`` side by side over T) sets it.
FUSED_MAX_TOKENS = 1024


def choose_design(tokens: int) -> str:
    """The design for a call with ``tokens`` rows of x; ``LCDD_TRITON_DESIGN`` (read at call time)
    forces one (``fused`` or ``split``; ``auto`` or unset chooses by shape)."""
    name = os.environ.get("LCDD_TRITON_DESIGN", "auto").strip().lower()
    if name in ("", "auto"):
        return "fused" if tokens <= FUSED_MAX_TOKENS else "split"
    if name not in DESIGNS:
        raise ValueError(
            f"LCDD_TRITON_DESIGN={name!r} is not a Triton design; set it to fused, split or auto (or unset it)"
        )
    return name


# ---------------------------------------------------------------------------------------------
# Launch configurations. On CUDA the GEMM kernels are autotuned. Under the interpreter (numpy,
# one program at a time) there is one fixed config, which autotune just uses without timing;
# its 64-wide tiles run the tests ~5x faster than 32-wide ones (fewer programs, each numpy op
# the same fixed overhead), and the tests' shapes straddle 64.
# ---------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: (rows of the output tile, columns of the output tile, reduction step, num_warps, num_stages).
#: Small row tiles serve the few-token calls that ``fused`` is dispatched for.
#:
#: Every config must compile without spills for fp32, fp16 and bf16 on sm_90 and sm_80
#: (``lcdd check-kernels`` checks it). Two budgets decide, per thread and per block:
#: registers — the fp32 accumulator (BM·BN / threads) plus the W and B tiles that form W_eff in
#: registers (BK·BN / threads each) must stay well under 255; shared memory — (stages − 1)
#: copies of the x, W and B tiles plus the epilogue's scratch, in fp32 (twice bf16), must fit
#: sm_80's 163 KiB. Hence three stages, 32-deep steps for the 128-wide tiles and 8 warps for
#: 128×128. Measured before (bf16, sm_90): (128, 128, 32, 4 warps) at 218 registers, the 4-stage
#: configs at 108–144 KiB of shared memory (fp32: beyond sm_80), (128, 128, 64, 8, 3) at 128 KiB
#: (fp32: beyond sm_90 too).
_GEMM_SHAPES = [
    (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 32, 4, 3), (64, 64, 64, 4, 3),
    (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 3),
]
#: The SwiGLU forward keeps two accumulators and forms two W_eff tiles per step: the same
#: budgets with both, so at most 32 accumulator registers a thread (2·BM·BN / threads) and
#: 32-deep steps. Measured (bf16): on the linear kernel's configs 2 spilled on sm_90 (32×64×128
#: and 32×128×64, 255 registers); at 64 accumulator registers a thread (64×64 with 4 warps,
#: 128×64 with 8) sm_90 is clean but sm_80's mma.sync spills (255 registers, 8–64 B).
_SWIGLU_SHAPES = [(16, 64, 32, 4, 3), (32, 64, 32, 4, 3), (64, 64, 32, 8, 3), (128, 32, 32, 8, 3)]
#: dW: the P tile's accumulator, then the epilogue holds P, W and B tiles at once (3·BN·BK /
#: threads registers): 8 warps for the 128-wide tiles.
#: No (BLOCK_N 128, BLOCK_K 64) tile: its fp32/TF32 build spilled 8 B at 128 registers on sm_80
#: whether it stepped 64 or 32 tokens (lcdd check-kernels).
_DW_SHAPES = [(64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3)]
#: fp32 without TF32 (``DOT_PRECISION="ieee"``) has no tensor-core MMA: ``tl.dot`` becomes FMAs
#: on register copies of both operand tiles (rows of x × BK and BK × columns of W_eff per
#: thread), so the reduction step must be short. On the tiles above, fp32 "ieee" spilled at
#: every config of the SwiGLU forward (20 B to 14.7 KB on sm_90), and the two-weight dx at
#: 64×64 with 8 warps (4 B on sm_90; 128×64 with 4 warps, tf32: 20 B on sm_80, hence 8 warps
#: in _GEMM_SHAPES). 16 is tl.dot's smallest K.
_FMA_GEMM_SHAPES = [(16, 32, 16, 4, 3), (32, 32, 16, 4, 3), (32, 64, 16, 4, 3)]
_FMA_SWIGLU_SHAPES = [(16, 32, 16, 4, 3), (32, 32, 16, 4, 3), (64, 32, 16, 8, 3)]
_FMA_DW_SHAPES = [(64, 64, 16, 8, 3)]
_INTERPRET_SHAPE = (64, 64, 64, 1, 1)
#: With LCDD_TRITON_AUTOTUNE=0 (read at import) CUDA uses one config per call: for GPU test runs,
#: where tuning every small test shape would cost more compile time than the tests themselves.
_UNTUNED_SHAPE = (64, 64, 64, 4, 3)  # one of _GEMM_SHAPES and _DW_SHAPES: checked there too
_UNTUNED_SWIGLU_SHAPE = _SWIGLU_SHAPES[2]
_UNTUNED_FMA_SHAPE = _FMA_DW_SHAPES[0]  # the dW and SwiGLU kernels'; the others use _FMA_GEMM_SHAPES[-1]
_TUNE = not _INTERPRET and os.environ.get("LCDD_TRITON_AUTOTUNE", "1") != "0"

#: Tile (rows, columns) and warps of the memory-bound element kernels (not autotuned: the dW
#: epilogue works in place, so rerunning it to time configs would corrupt its result).
_ELEM_BLOCK, _ELEM_WARPS = ((64, 64), 1) if _INTERPRET else ((64, 128), 8)


def _autotune(names, shapes, key, fma_shapes, untuned=_UNTUNED_SHAPE, untuned_fma=_UNTUNED_FMA_SHAPE):
    """Autotune over ``shapes`` for tensor-core dots and ``fma_shapes`` for fp32 "ieee" dots
    (pruned per call by the first tensor's dtype and DOT_PRECISION, before any timing)."""
    if _INTERPRET:
        shapes = fma_shapes = [_INTERPRET_SHAPE]
    elif not _TUNE:
        shapes, fma_shapes = [untuned], [untuned_fma]
    configs, seen = [], set()
    for s in list(shapes) + list(fma_shapes):
        if s not in seen:
            seen.add(s)
            configs.append(triton.Config(dict(zip(names, s[:3])), num_warps=s[3], num_stages=s[4]))

    def shape(config):
        return tuple(config.kwargs[n] for n in names) + (config.num_warps, config.num_stages)

    def by_dot(configs, nargs, **kwargs):
        first = next(v for v in nargs.values() if hasattr(v, "element_size"))
        fma = first.element_size() == 4 and kwargs.get("DOT_PRECISION", nargs.get("DOT_PRECISION")) == "ieee"
        allowed = set(fma_shapes if fma else shapes)
        return [c for c in configs if shape(c) in allowed]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": by_dot})


#: The dW partial-sum buffers are allocated before autotuning picks a tile, so the fused dW
#: kernel writes its partial sums at the granularity of the smallest tile any config uses. The
#: interpreter uses half its tile, so that the tests run the several-parts-per-tile path too.
_DW_PART_N, _DW_PART_K = (
    (min(s[0] for s in _DW_SHAPES + _FMA_DW_SHAPES), min(s[1] for s in _DW_SHAPES + _FMA_DW_SHAPES)) if _TUNE
    else (_INTERPRET_SHAPE[0] // 2, _INTERPRET_SHAPE[1] // 2) if _INTERPRET
    else (min(_UNTUNED_SHAPE[0], _UNTUNED_FMA_SHAPE[0]), min(_UNTUNED_SHAPE[1], _UNTUNED_FMA_SHAPE[1]))
)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs in full fp32 unless torch allows TF32 (as cuBLAS would); ignored for fp16/bf16."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _bucket(tokens: int) -> int:
    """Autotune key for the token count: a new tuning per power of two, not per batch shape."""
    return triton.next_power_of_2(max(tokens, 1))


# ---------------------------------------------------------------------------------------------
# Kernels. Weights and bases are row-major contiguous (N, K); activations are strided.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _weff_tile(w_ptrs, b_ptrs, rc, mask):
    """One tile of W_eff = B + (r cᵀ) ⊙ (W − B) in fp32; ``rc`` is the tile of r cᵀ."""
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    return b + rc * (w - b)


@triton.jit
def _dw_epilogue(p, w_ptr, b_ptr, r_ptr, c_ptr, dw_ptr, dr_part_ptr, dc_part_ptr, offs_n, offs_k, N, K,
                 stride_drp, pid_n, pid_k, STORE_DW: tl.constexpr, NEED_DR: tl.constexpr, NEED_DC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PART_N: tl.constexpr, PART_K: tl.constexpr):
    """From one fp32 (BLOCK_N, BLOCK_K) tile of P = Gᵀ X: dW = P ⊙ (r cᵀ), and partial sums
    dr_i = Σ_j P_ij c_j (W − B)_ij over each PART_K columns (row j // PART_K of dr_part, (·, N)) and
    dc_j = Σ_i P_ij r_i (W − B)_ij over each PART_N rows (row i // PART_N of dc_part, (·, K)).
    Partials at a fixed granularity, not per tile, so every autotuned tile fills the same buffers
    exactly once (no zeroing, and nothing stale from the configs tried while tuning)."""
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    r = tl.load(r_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    offs = offs_n[:, None] * K + offs_k[None, :]
    if STORE_DW:
        tl.store(dw_ptr + offs, (p * (r[:, None] * c[None, :])).to(dw_ptr.dtype.element_ty), mask=mask)
    if NEED_DR or NEED_DC:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = p * (w - b)
        if NEED_DR:
            qc = q * c[None, :]
            for j in tl.static_range(BLOCK_K // PART_K):
                row = pid_k * (BLOCK_K // PART_K) + j
                part = tl.sum(tl.where((tl.arange(0, BLOCK_K) // PART_K == j)[None, :], qc, 0.0), axis=1)
                tl.store(dr_part_ptr + row * stride_drp + offs_n, part, mask=mask_n & (row * PART_K + 0 * offs_n < K))
        if NEED_DC:
            qr = q * r[:, None]
            for j in tl.static_range(BLOCK_N // PART_N):
                row = pid_n * (BLOCK_N // PART_N) + j
                part = tl.sum(tl.where((tl.arange(0, BLOCK_N) // PART_N == j)[:, None], qr, 0.0), axis=0)
                tl.store(dc_part_ptr + row * K + offs_k, part, mask=mask_k & (row * PART_N + 0 * offs_k < N))


@triton.jit
def _out_tile(m_ptr, T, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) output tile of a (T, N) result over the grid's first two axes: token
    and column offsets (tokens in int64: T·stride can pass 2^31), their bounds, and the slice of
    the channel mask along N (r for the forward kernels' rows, c for dx's columns)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < T
    mask_n = offs_n < N
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return offs_m, offs_n, mask_m, mask_n, m


@triton.jit
def _x_c_step(x_ptr, c_ptr, offs_m, mask_m, k0, K, stride_xt, stride_xk, BLOCK_K: tl.constexpr):
    """One step of the forward kernels' K loop: the (BLOCK_M, BLOCK_K) tile of x and the column
    mask's slice, with their offsets and bounds (both forward kernels walk K the same way)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    c = tl.load(c_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    return x, c, offs_k, mask_k


@_autotune(("BLOCK_M", "BLOCK_N", "BLOCK_K"), _GEMM_SHAPES, ["M_BUCKET", "N", "K"], _FMA_GEMM_SHAPES,
           untuned_fma=_FMA_GEMM_SHAPES[-1])
@triton.jit
def _masked_delta_forward_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, c_ptr, bias_ptr, out_ptr,
    T, N, K, stride_xt, stride_xk, M_BUCKET,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (T, N) = x W_effᵀ (+ bias). Token tiles vary fastest over the grid, so programs running
    together share weight tiles in L2. ``M_BUCKET`` only keys the autotuner."""
    offs_m, offs_n, mask_m, mask_n, r = _out_tile(r_ptr, T, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, c, offs_k, mask_k = _x_c_step(x_ptr, c_ptr, offs_m, mask_m, k0, K, stride_xt, stride_xk, BLOCK_K)
        offs_w = offs_n[None, :] * K + offs_k[:, None]  # the (BLOCK_K, BLOCK_N) tile of Wᵀ
        wt = _weff_tile(w_ptr + offs_w, b_ptr + offs_w, c[:, None] * r[None, :],
                        mask_k[:, None] & mask_n[None, :]).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@_autotune(("BLOCK_M", "BLOCK_N", "BLOCK_K"), _SWIGLU_SHAPES, ["M_BUCKET", "N", "K"], _FMA_SWIGLU_SHAPES,
           untuned=_UNTUNED_SWIGLU_SHAPE)
@triton.jit
def _masked_delta_swiglu_forward_kernel(
    x_ptr, w_ptr, b_ptr, w2_ptr, b2_ptr, r_ptr, c_ptr, out_ptr, gu_ptr,
    T, N, K, stride_xt, stride_xk, M_BUCKET, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The SwiGLU forward: W/B are the gate and W2/B2 the up weights, both accumulated from one
    load of each x tile; g and u go to gu (T, 2, N) and out = silu(g) · u.

    Its own kernel, with its own configs (``_SWIGLU_SHAPES``), because it holds two fp32
    accumulators and forms two W_eff tiles per step: on the linear kernel's tiles (one
    accumulator) that is twice the registers, and ptxas spilled some of those configs (up to
    1.9 KB of stack per thread in the first check; lcdd_kernels/kernel_check finds them)."""
    offs_m, offs_n, mask_m, mask_n, r = _out_tile(r_ptr, T, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, c, offs_k, mask_k = _x_c_step(x_ptr, c_ptr, offs_m, mask_m, k0, K, stride_xt, stride_xk, BLOCK_K)
        offs_w = offs_n[None, :] * K + offs_k[:, None]  # the (BLOCK_K, BLOCK_N) tile of Wᵀ
        mask_w = mask_k[:, None] & mask_n[None, :]
        rc = c[:, None] * r[None, :]
        wt = _weff_tile(w_ptr + offs_w, b_ptr + offs_w, rc, mask_w).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, wt, acc, input_precision=DOT_PRECISION)
        wt2 = _weff_tile(w2_ptr + offs_w, b2_ptr + offs_w, rc, mask_w).to(x_ptr.dtype.element_ty)
        acc2 = tl.dot(x, wt2, acc2, input_precision=DOT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    gu = gu_ptr + offs_m[:, None] * (2 * N) + offs_n[None, :]
    tl.store(gu, acc.to(gu_ptr.dtype.element_ty), mask=mask)
    tl.store(gu + N, acc2.to(gu_ptr.dtype.element_ty), mask=mask)
    out = acc * tl.sigmoid(acc) * acc2
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_accumulate(acc, g_ptrs, w_ptr, b_ptr, r_ptr, c, offs_k, mask_m, mask_k, N, K, stride_gn,
                   DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc += G W_eff over all N, for the (BLOCK_M, BLOCK_K) tile of dx; g_ptrs point at column
    0 of this tile's rows of G."""
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        r = tl.load(r_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        offs_w = offs_n[:, None] * K + offs_k[None, :]
        g = tl.load(g_ptrs + offs_n[None, :] * stride_gn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = _weff_tile(w_ptr + offs_w, b_ptr + offs_w, r[:, None] * c[None, :],
                       mask_n[:, None] & mask_k[None, :]).to(g_ptrs.dtype.element_ty)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
    return acc


@_autotune(("BLOCK_M", "BLOCK_K", "BLOCK_N"), _GEMM_SHAPES, ["M_BUCKET", "N", "K", "TWO"], _FMA_GEMM_SHAPES,
           untuned_fma=_FMA_GEMM_SHAPES[-1])
@triton.jit
def _masked_delta_backward_dx_kernel(
    g_ptr, w_ptr, b_ptr, w2_ptr, b2_ptr, r_ptr, c_ptr, dx_ptr,
    T, N, K, stride_gt, stride_gp, stride_gn, M_BUCKET,
    TWO: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx (T, K) = G₀ W_eff (+ G₁ W2_eff when TWO), one fp32 accumulator; G is (T, 1 or 2, N)."""
    offs_m, offs_k, mask_m, mask_k, c = _out_tile(c_ptr, T, K, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g_ptrs = g_ptr + offs_m[:, None] * stride_gt
    acc = _dx_accumulate(acc, g_ptrs, w_ptr, b_ptr, r_ptr, c, offs_k, mask_m, mask_k, N, K, stride_gn,
                         DOT_PRECISION, BLOCK_N)
    if TWO:
        # The second weight in a second pass over N, not interleaved in the first: one W_eff
        # tile (and its W, B loads in flight) live at a time. Interleaved, 5 of the 8 configs
        # spilled on sm_90 (found by lcdd_kernels/kernel_check).
        acc = _dx_accumulate(acc, g_ptrs + stride_gp, w2_ptr, b2_ptr, r_ptr, c, offs_k, mask_m, mask_k, N, K,
                             stride_gn, DOT_PRECISION, BLOCK_N)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@_autotune(("BLOCK_N", "BLOCK_K", "BLOCK_T"), _DW_SHAPES, ["M_BUCKET", "N", "K"], _FMA_DW_SHAPES)
@triton.jit
def _masked_delta_backward_dw_kernel(
    g_ptr, x_ptr, w_ptr, b_ptr, r_ptr, c_ptr, dw_ptr, dr_part_ptr, dc_part_ptr,
    T, N, K, stride_gt, stride_gn, stride_xt, stride_xk, stride_drp, M_BUCKET,
    STORE_DW: tl.constexpr, NEED_DR: tl.constexpr, NEED_DC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PART_N: tl.constexpr, PART_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_K) tile of P = Gᵀ X, accumulated over all T tokens in fp32, then
    :func:`_dw_epilogue`. G is (T, N), X is (T, K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask_t = offs_t < T
        g = tl.load(g_ptr + offs_t[:, None] * stride_gt + offs_n[None, :] * stride_gn,
                    mask=mask_t[:, None] & (offs_n[None, :] < N), other=0.0)
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                    mask=mask_t[:, None] & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PRECISION)
    _dw_epilogue(acc, w_ptr, b_ptr, r_ptr, c_ptr, dw_ptr, dr_part_ptr, dc_part_ptr, offs_n, offs_k, N, K,
                 stride_drp, pid_n, pid_k, STORE_DW, NEED_DR, NEED_DC, BLOCK_N, BLOCK_K, PART_N, PART_K)


@triton.jit
def _masked_delta_weff_kernel(w_ptr, b_ptr, r_ptr, c_ptr, out_ptr, N, K, stride_w, stride_out,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (N, K) = one block of W_eff, from W/B blocks with row stride ``stride_w``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    r = tl.load(r_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    offs = offs_n[:, None] * stride_w + offs_k[None, :]
    weff = _weff_tile(w_ptr + offs, b_ptr + offs, r[:, None] * c[None, :], mask)
    tl.store(out_ptr + offs_n[:, None] * stride_out + offs_k[None, :], weff.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_delta_dw_epilogue_kernel(p_ptr, w_ptr, b_ptr, r_ptr, c_ptr, dw_ptr, dr_part_ptr, dc_part_ptr,
                                     N, K, stride_drp, STORE_DW: tl.constexpr, NEED_DR: tl.constexpr,
                                     NEED_DC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_dw_epilogue` over a P (N, K) that cuBLAS wrote (dW may be P itself: in place)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    p = tl.load(p_ptr + offs_n[:, None] * K + offs_k[None, :],
                mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
    _dw_epilogue(p, w_ptr, b_ptr, r_ptr, c_ptr, dw_ptr, dr_part_ptr, dc_part_ptr, offs_n, offs_k, N, K,
                 stride_drp, pid_n, pid_k, STORE_DW, NEED_DR, NEED_DC, BLOCK_N, BLOCK_K, BLOCK_N, BLOCK_K)


@triton.jit
def _swiglu_forward_kernel(gu_ptr, h_ptr, T, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """h (T, F) = silu(g) · u from gu (T, 2, F), in fp32, rounded once."""
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_t[:, None] < T) & (offs_f[None, :] < F)
    gu = gu_ptr + offs_t[:, None] * (2 * F) + offs_f[None, :]
    g = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu + F, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs_t[:, None] * F + offs_f[None, :], (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _swiglu_backward_kernel(dh_ptr, gu_ptr, dgu_ptr, T, F, stride_dht, stride_dhf,
                            BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """dgu (T, 2, F) = (dL/dg, dL/du) of h = silu(g) · u, with silu(g) recomputed, in fp32."""
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_t[:, None] < T) & (offs_f[None, :] < F)
    offs = offs_t[:, None] * (2 * F) + offs_f[None, :]
    g = tl.load(gu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + offs + F, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs_t[:, None] * stride_dht + offs_f[None, :] * stride_dhf, mask=mask,
                 other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dgu_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + offs + F, (dh * g * s).to(dgu_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host launchers. ``pairs`` is [(W, B)] for a linear layer or [(Wg, Bg), (Wu, Bu)] for SwiGLU,
# each contiguous (N, K); x2 is (T, K) and may be strided.
# ---------------------------------------------------------------------------------------------


def _elem_grid(n: int, k: int):
    return triton.cdiv(n, _ELEM_BLOCK[0]), triton.cdiv(k, _ELEM_BLOCK[1])


def _swiglu_forward(gu, h):
    """h (T, F) ← silu(g) · u for gu (T, 2, F)."""
    t, _, f = gu.shape
    if t:
        _swiglu_forward_kernel[_elem_grid(t, f)](gu, h, t, f, BLOCK_T=_ELEM_BLOCK[0], BLOCK_F=_ELEM_BLOCK[1],
                                                 num_warps=_ELEM_WARPS)


def _swiglu_backward(dh, gu, dgu):
    """dgu (T, 2, F) ← gradients with respect to g and u, from dh (T, F) and gu (T, 2, F).
    ``dgu`` may be ``gu``: every program reads its tile of g and u before writing the same tile."""
    t, _, f = gu.shape
    if t:
        _swiglu_backward_kernel[_elem_grid(t, f)](dh, gu, dgu, t, f, dh.stride(0), dh.stride(1),
                                                  BLOCK_T=_ELEM_BLOCK[0], BLOCK_F=_ELEM_BLOCK[1],
                                                  num_warps=_ELEM_WARPS)
    return dgu


def _outputs(x2, pairs):
    """(out (T, N), gu (T, 2, N) for SwiGLU else None), uninitialised."""
    t, n = x2.shape[0], pairs[0][0].shape[0]
    return x2.new_empty(t, n), (x2.new_empty(t, 2, n) if len(pairs) == 2 else None)


def _fused_forward(x2, pairs, r, c, bias):
    t, k = x2.shape
    n = pairs[0][0].shape[0]
    out, gu = _outputs(x2, pairs)
    if t:
        grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        common = (t, n, k, x2.stride(0), x2.stride(1), _bucket(t))
        if gu is None:
            (w, b), = pairs
            _masked_delta_forward_kernel[grid](x2, w, b, r, c, bias, out, *common, HAS_BIAS=bias is not None,
                                               DOT_PRECISION=_dot_precision(x2.dtype))
        else:
            (w, b), (w2, b2) = pairs
            _masked_delta_swiglu_forward_kernel[grid](x2, w, b, w2, b2, r, c, out, gu, *common,
                                                      DOT_PRECISION=_dot_precision(x2.dtype))
    return out, gu


def _fused_dx(g, pairs, r, c):
    """dx (T, K) = Σ_p G[:, p] W_eff,p for g (T, len(pairs), N), in one kernel."""
    t, _, n = g.shape
    k = pairs[0][0].shape[1]
    dx = g.new_empty(t, k)
    if t:
        (w, b), (w2, b2) = pairs[0], pairs[-1]
        grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        _masked_delta_backward_dx_kernel[grid](
            g, w, b, w2, b2, r, c, dx, t, n, k, g.stride(0), g.stride(1), g.stride(2), _bucket(t),
            TWO=len(pairs) == 2, DOT_PRECISION=_dot_precision(g.dtype),
        )
    return dx


def _sum_rows(part):
    """Reduce per-part partial sums (parts, L) → (L,) in a fixed order; None stays None."""
    return None if part is None else part.sum(0)


def _fused_dw(g, x2, w, b, r, c, need_dw, need_dr, need_dc):
    """(dW, dr, dc) of one weight from G (T, N) and X (T, K); each None unless needed; dr, dc fp32."""
    if not (need_dw or need_dr or need_dc):
        return None, None, None
    t, k = x2.shape
    n = w.shape[0]
    dw = torch.empty_like(w) if need_dw else None
    f32 = dict(dtype=torch.float32, device=w.device)
    dr_part = torch.empty(triton.cdiv(k, _DW_PART_K), n, **f32) if need_dr else None
    dc_part = torch.empty(triton.cdiv(n, _DW_PART_N), k, **f32) if need_dc else None
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    _masked_delta_backward_dw_kernel[grid](
        g, x2, w, b, r, c, dw, dr_part, dc_part, t, n, k, g.stride(0), g.stride(1), x2.stride(0), x2.stride(1),
        n, _bucket(t), STORE_DW=need_dw, NEED_DR=need_dr, NEED_DC=need_dc, DOT_PRECISION=_dot_precision(x2.dtype),
        PART_N=_DW_PART_N, PART_K=_DW_PART_K,
    )
    return dw, _sum_rows(dr_part), _sum_rows(dc_part)


def _weff_into(out, w, b, r, c):
    """out (n, k) ← W_eff of the (n, k) views w, b (row stride of the full weight)."""
    n, k = out.shape
    _masked_delta_weff_kernel[_elem_grid(n, k)](w, b, r, c, out, n, k, w.stride(0), out.stride(0),
                                                BLOCK_N=_ELEM_BLOCK[0], BLOCK_K=_ELEM_BLOCK[1], num_warps=_ELEM_WARPS)
    return out


def _split_forward(x2, pairs, r, c, bias):
    """Row blocks of W_eff, each written once and consumed by one cuBLAS GEMM per weight."""
    out, gu = _outputs(x2, pairs)
    targets = [out] if gu is None else [gu[:, 0], gu[:, 1]]
    n, k = pairs[0][0].shape
    for s, e in row_blocks(n, k):
        weff = x2.new_empty(e - s, k)
        for (w, b), y in zip(pairs, targets):
            torch.mm(x2, _weff_into(weff, w[s:e], b[s:e], r[s:e], c).t(), out=y[:, s:e])
    if gu is not None:
        _swiglu_forward(gu, out)
    elif bias is not None:
        out.add_(bias)
    return out, gu


def _split_dx(g, pairs, r, c):
    """dx = [G₀ G₁ …] [W_eff,0; W_eff,1; …] by column blocks of K: every dx column block is one
    cuBLAS GEMM over all weights stacked (rounded once), from a small transient."""
    t, p, n = g.shape
    k = pairs[0][0].shape[1]
    g_all = g.reshape(t, p * n)
    dx = g.new_empty(t, k)
    for s, e in row_blocks(k, n):  # the same blocking, over columns
        weff = g.new_empty(p * n, e - s)
        for i, (w, b) in enumerate(pairs):
            _weff_into(weff[i * n:(i + 1) * n], w[:, s:e], b[:, s:e], r, c[s:e])
        torch.mm(g_all, weff, out=dx[:, s:e])
    return dx


def _split_dw(g, x2, w, b, r, c, need_dw, need_dr, need_dc):
    """cuBLAS writes P = Gᵀ X straight into dW's storage (one GEMM) and the epilogue kernel turns
    it into dW in place; without dW, P lives one row block at a time."""
    if not (need_dw or need_dr or need_dc):
        return None, None, None
    n, k = w.shape
    bn, bk = _ELEM_BLOCK
    dw = torch.empty_like(w) if need_dw else None
    blocks = [(0, n)] if need_dw else row_blocks(n, k)
    f32 = dict(dtype=torch.float32, device=w.device)
    dr_part = torch.empty(triton.cdiv(k, bk), n, **f32) if need_dr else None
    dc_part = torch.empty(sum(triton.cdiv(e - s, bn) for s, e in blocks), k, **f32) if need_dc else None
    tile0 = 0
    for s, e in blocks:
        p = torch.mm(g[:, s:e].t(), x2, out=dw) if need_dw else g[:, s:e].t() @ x2
        _masked_delta_dw_epilogue_kernel[_elem_grid(e - s, k)](
            p, w[s:e], b[s:e], r[s:e], c, dw, None if dr_part is None else dr_part[:, s:],
            None if dc_part is None else dc_part[tile0:], e - s, k, n,
            STORE_DW=need_dw, NEED_DR=need_dr, NEED_DC=need_dc, BLOCK_N=bn, BLOCK_K=bk, num_warps=_ELEM_WARPS,
        )
        tile0 += triton.cdiv(e - s, bn)
    return dw, _sum_rows(dr_part), _sum_rows(dc_part)


class _Design(NamedTuple):
    forward: object  # (x2, pairs, r, c, bias) -> (out (T, N), gu (T, 2, N) or None)
    dx: object  # (g (T, P, N), pairs, r, c) -> dx (T, K)
    dw: object  # (g (T, N), x2, w, b, r, c, need_dw, need_dr, need_dc) -> (dW, dr fp32, dc fp32)


_IMPL = {
    "fused": _Design(_fused_forward, _fused_dx, _fused_dw),
    "split": _Design(_split_forward, _split_dx, _split_dw),
}


# ---------------------------------------------------------------------------------------------
# Deprecated entry points. The registered ops (torch.ops.lcdd.masked_delta_*, reached through
# lcdd_kernels.masked_delta_linear / masked_delta_swiglu) are the one autograd path; these call
# them with the Triton backend. (Importing this module imports lcdd_kernels.ops first, which
# registers the ops.)
# ---------------------------------------------------------------------------------------------


def _deprecated(name: str) -> None:
    warnings.warn(f"lcdd_kernels.ops.masked_delta_triton.{name} is deprecated; use "
                  f"lcdd_kernels.{name}(..., backend='triton') (it validates the arguments and casts the masks)",
                  DeprecationWarning, stacklevel=3)


def masked_delta_linear(x, weight, base, r, c, bias=None):
    """Deprecated: ``lcdd_kernels.masked_delta_linear(..., backend="triton")``. x (..., K),
    weight/base (N, K), r (N,), c (K,) in x's dtype, bias (N,) or None → (..., N)."""
    _deprecated("masked_delta_linear")
    return torch.ops.lcdd.masked_delta_linear(x, weight, base, r, c, bias, "triton")


def masked_delta_swiglu(x, gate_weight, gate_base, up_weight, up_base, r, c):
    """Deprecated: ``lcdd_kernels.masked_delta_swiglu(..., backend="triton")``. x (..., K), the
    four weights (F, K), r (F,), c (K,) in x's dtype → silu(g) · u, (..., F)."""
    _deprecated("masked_delta_swiglu")
    return torch.ops.lcdd.masked_delta_swiglu(x, gate_weight, gate_base, up_weight, up_base, r, c, "triton", True)[0]
