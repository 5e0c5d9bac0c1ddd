"""Comparison helpers shared by the tests.

Low-precision rule (from flash-attention): a kernel's error against a float64 reference must be at
most twice the error of PyTorch's own run of the reference in the same low precision, plus a small
absolute slack. That is honest for every dtype and never vacuous.
"""

from __future__ import annotations

import torch

#: Absolute slack per dtype, relative to the reference's magnitude.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def describe_mismatch(name: str, out: torch.Tensor, ref: torch.Tensor, bound: float) -> str:
    out64, ref64 = out.double(), ref.double()
    err = (out64 - ref64).abs()
    bad = (err > bound) | ~torch.isfinite(out64)
    idx = bad.nonzero()[:5].tolist()
    return (
        f"{name}: max |err| {err.max().item():.3e} > bound {bound:.3e}; "
        f"{int(bad.sum())} of {out.numel()} elements off; first at {idx}; "
        f"NaN {int(torch.isnan(out64).sum())}, inf {int(torch.isinf(out64).sum())}"
    )


def assert_close(name: str, out: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, factor: float = 2.0) -> None:
    """``out`` against the float64 reference ``ref64``; ``lowp`` is PyTorch's own low-precision run."""
    assert out is not None, f"{name}: no value (None)"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    dtype = dtype or out.dtype
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    base = 0.0 if lowp is None else (lowp.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    bound = factor * base + ATOL[dtype] * max(scale, 1.0)
    if ref64.numel() == 0:
        return
    assert torch.isfinite(out).all(), describe_mismatch(name, out, ref64, bound)
    err = (out.double() - ref64).abs().max().item()
    assert err <= bound, describe_mismatch(name, out, ref64, bound)
