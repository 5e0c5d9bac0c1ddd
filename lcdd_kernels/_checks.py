"""Argument validation shared by every op.

Every message names the op, the argument, what it got and what it expected, so that a bad call
fails at the front door instead of deep inside a kernel.
"""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def floating(op: str, name: str, t: torch.Tensor) -> None:
    tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {t.dtype}; convert it with .float() or .to(dtype)"
        )


def ndim(op: str, name: str, t: torch.Tensor, n: int, meaning: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{op}: {name} must be {n}-D {meaning}, got shape {_shape(t)}")


def min_ndim(op: str, name: str, t: torch.Tensor, n: int, meaning: str) -> None:
    if t.dim() < n:
        raise ValueError(f"{op}: {name} must be at least {n}-D {meaning}, got shape {_shape(t)}")


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        exp = "(" + ", ".join(str(e) for e in expected) + ")"
        raise ValueError(f"{op}: {name} must have shape {exp} {meaning}, got {_shape(t)}")


def in_features(op: str, name: str, x: torch.Tensor, weight_name: str, weight: torch.Tensor) -> None:
    """``x`` (..., K) against an (N, K) weight: its last dimension must be K."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"{op}: {name} has shape {_shape(x)} ({x.shape[-1]} features in its last dimension) but "
            f"{weight_name} has K = {k} input features (shape ({n}, {k})); {name} must be (..., {k})"
        )


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                f"cast them to one dtype (e.g. {name}.to({ref_name}.dtype))"
            )


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                f"move them to one device (e.g. {name}.to({ref_name}.device))"
            )


def no_grad_required(op: str, name: str, t: torch.Tensor, why: str) -> None:
    if t.requires_grad:
        raise ValueError(f"{op}: {name} must not require grad ({why}); pass {name}.detach()")


def index_tensor(op: str, name: str, t: torch.Tensor, upper: int | None, device: torch.device,
                 meaning: str = "(a vector of indices)") -> None:
    """A 1-D int32/int64 vector of indices in [0, upper), any order, repeats allowed.

    ``upper=None`` skips the range test (indices the caller has already checked). The range
    test is one reduction and one host sync (it matters on a GPU); min and max are computed
    only to word the error.
    """
    tensor(op, name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64 indices, got {t.dtype}")
    ndim(op, name, t, 1, meaning)
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}; move it with .to()")
    if t.numel() == 0 or upper is None:
        return
    # an int32 vector compared with a bound beyond int32 would wrap the bound: no index can reach it
    bad = (t < 0) if upper > torch.iinfo(t.dtype).max else (t < 0) | (t >= upper)
    if bool(bad.any()):
        lo, hi = int(t.min()), int(t.max())
        raise ValueError(f"{op}: {name} holds indices out of range [0, {upper}): min {lo}, max {hi}")


def index_vector(op: str, name: str, t: torch.Tensor, upper: int, device: torch.device) -> None:
    """A 1-D int32/int64 vector of sorted, unique indices in [0, upper)."""
    index_tensor(op, name, t, upper, device)
    if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
        raise ValueError(
            f"{op}: {name} must be sorted and unique (strictly increasing); "
            f"use torch.unique({name}) which sorts and deduplicates"
        )
