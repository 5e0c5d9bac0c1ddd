"""Heaviside channel masks with a straight-through estimator (SPEC §2)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class _HeavisideST(torch.autograd.Function):
    """Forward ``1[θ > 0]`` exactly; backward ``σ'(θ)``.

    SPEC §2 writes the value as ``1[θ>0] − σ(θ).detach() + σ(θ)``, which has this gradient but is
    binary only up to float rounding; a Function keeps the forward exactly 0/1.
    """

    @staticmethod
    def forward(ctx, theta):
        ctx.save_for_backward(theta)
        return (theta > 0).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        s = torch.sigmoid(theta)
        return grad * s * (1 - s)


def heaviside_st(theta: torch.Tensor) -> torch.Tensor:
    """Binary mask values ``1[θ > 0]`` whose gradient with respect to θ is ``σ'(θ)``."""
    return _HeavisideST.apply(theta)


class HeavisideMask(nn.Module):
    """A flat vector of mask logits θ with named ranges.

    Args:
        n: total number of mask entries (ignored when ``groups`` is given: it is their sum).
        init_mean, init_std: θ ~ N(init_mean, init_std) at construction (SPEC: 1.5, 0.5).
        groups: optional ordered ``{name: length}``; their concatenation is the flat layout.
        generator: optional ``torch.Generator`` for a reproducible init.

    ``forward()`` returns the mask values (binary; straight-through gradient in training mode,
    plain 0/1 without a graph in eval mode). ``l0()`` is ``Σ σ(θ)``. ``group(name)`` /
    ``split()`` give per-range views of one forward.
    """

    def __init__(
        self,
        n: int | None = None,
        init_mean: float = 1.5,
        init_std: float = 0.5,
        groups: Mapping[str, int] | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if groups is not None:
            groups = {str(k): int(v) for k, v in groups.items()}
            if any(v < 0 for v in groups.values()):
                raise ValueError(f"HeavisideMask: group lengths must be >= 0, got {groups}")
            total = sum(groups.values())
            if n is not None and n != total:
                raise ValueError(f"HeavisideMask: n={n} but the groups add up to {total}")
            n = total
        if n is None or n < 0:
            raise ValueError(f"HeavisideMask: n must be a non-negative length, got {n}")
        self.groups: dict[str, int] = dict(groups) if groups is not None else {"all": n}
        self._offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, length in self.groups.items():
            self._offsets[name] = (off, off + length)
            off += length
        theta = torch.empty(n, dtype=dtype, device=device)
        with torch.no_grad():
            theta.normal_(init_mean, init_std, generator=generator)
        self.theta = nn.Parameter(theta)

    def extra_repr(self) -> str:
        return f"n={self.theta.numel()}, groups={list(self.groups)}"

    def __len__(self) -> int:
        return self.theta.numel()

    def forward(self) -> torch.Tensor:
        return self._binary(self.theta)

    def _binary(self, theta: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return heaviside_st(theta)
        return (theta.detach() > 0).to(theta.dtype)

    def l0(self) -> torch.Tensor:
        """Expected number of active entries, ``Σ σ(θ)`` (the sparsity penalty of SPEC §3)."""
        return torch.sigmoid(self.theta).sum()

    def range(self, name: str) -> tuple[int, int]:
        """(start, end) of a named group in the flat layout."""
        try:
            return self._offsets[name]
        except KeyError:
            raise KeyError(f"HeavisideMask: no group {name!r}; groups are {list(self.groups)}") from None

    def split(self, values: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-group views of ``values`` (default: one fresh ``forward()``)."""
        values = self() if values is None else values
        return {name: values[a:b] for name, (a, b) in self._offsets.items()}

    def group(self, name: str) -> torch.Tensor:
        """``forward()[a:b]`` for the group, computed on its slice of θ alone (each patched
        projection asks for its two groups on every forward)."""
        a, b = self.range(name)
        return self._binary(self.theta[a:b])

    def group_theta(self, name: str) -> torch.Tensor:
        a, b = self.range(name)
        return self.theta[a:b]

    def active(self) -> torch.Tensor:
        """Boolean vector of entries that are on (θ > 0)."""
        return self.theta.detach() > 0

    def density(self) -> float:
        n = self.theta.numel()
        return float(self.active().sum()) / n if n else 0.0
