"""Kernels the check must flag (and one it must pass), with the launches that reach them."""

import torch
import triton
import triton.language as tl


@triton.jit
def _spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # A BLOCK x BLOCK fp32 tile held across a reduction by one warp: 128·128/32 = 512 values per
    # thread must stay live, twice the 255 registers a thread can have.
    offs = tl.arange(0, BLOCK)
    ptrs = offs[:, None] * BLOCK + offs[None, :]
    x = tl.load(x_ptr + ptrs)
    s = tl.sum(x, axis=0)
    tl.store(out_ptr + ptrs, x / s[None, :])


@triton.jit
def _broken_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    # tl.dot of a (BLOCK, 2·BLOCK) by a (BLOCK, BLOCK) tile: the inner dimensions differ.
    offs = tl.arange(0, BLOCK)
    wide = tl.arange(0, 2 * BLOCK)
    a = tl.load(a_ptr + offs[:, None] * (2 * BLOCK) + wide[None, :])
    b = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


@triton.jit
def _clean_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


@triton.jit
def _never_launched_kernel(x_ptr):
    tl.store(x_ptr, 1.0)


def scenarios(dtype_name):
    dtype = getattr(torch, dtype_name)

    def spill():
        x = torch.zeros(128, 128, dtype=dtype)
        _spilling_kernel[(1,)](x, torch.empty_like(x), BLOCK=128, num_warps=1)

    def broken():
        a = torch.zeros(32, 32, dtype=dtype)
        _broken_kernel[(1,)](a, torch.empty(16, 16, dtype=dtype), BLOCK=16)

    def clean():
        x = torch.zeros(4096, dtype=dtype)
        _clean_kernel[(4,)](x, torch.empty_like(x), 4096, BLOCK=1024)

    yield "spill", spill
    yield "broken", broken
    yield "clean", clean
