"""A float64 oracle for every op, written from docs/spec.md alone (§1, §4, §5).

Independent of the package: nothing here imports lcdd_kernels, and the gradients are the SPEC's
closed forms, not autograd through the ops' own ``*_ref`` functions. Every function takes and
returns plain tensors and computes in the dtype of its inputs, so the same code evaluated in
float16 is "plain PyTorch's own low-precision run" the fuzz tests measure a kernel's error by.

Token layout: x of shape (..., K) is flattened row-major to (T, K); outputs are reshaped back.
"""

from __future__ import annotations

import math

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (T, K) without reshape's "-1" (which fails for K = 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# ----- §1: masked-delta projection --------------------------------------------------------------


def w_eff(w, b, r, c):
    """W_eff = B + (r cᵀ) ⊙ (W − B)."""
    return b + (r[:, None] * c[None, :]) * (w - b)


def linear(x, w, b, r, c, bias=None):
    """y = x W_effᵀ + b, shape (..., N)."""
    y = _flat(x) @ w_eff(w, b, r, c).t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear_grads(x, w, b, r, c, gy):
    """SPEC §1's backward: (dx, dW, dr, dc, db) for the cotangent ``gy`` of shape (..., N)."""
    X, G = _flat(x), _flat(gy)
    P = G.t() @ X  # (N, K)
    D = w - b
    dx = (G @ w_eff(w, b, r, c)).reshape(x.shape)
    dw = (r[:, None] * c[None, :]) * P
    dr = (P * c[None, :] * D).sum(1)
    dc = (P * r[:, None] * D).sum(0)
    db = G.sum(0)
    return dx, dw, dr, dc, db


def swiglu(x, wg, bg, wu, bu, r, c):
    """h = silu(g) ⊙ u with g, u the two masked-delta projections sharing (r, c)."""
    g, u = linear(x, wg, bg, r, c), linear(x, wu, bu, r, c)
    return g * torch.sigmoid(g) * u


def swiglu_grads(x, wg, bg, wu, bu, r, c, gh):
    """(dx, dWg, dWu, dr, dc): the chain rule through silu(g)·u, then §1 for each projection;
    the shared masks and x receive the sum of both projections' gradients."""
    g, u = linear(x, wg, bg, r, c), linear(x, wu, bu, r, c)
    s = torch.sigmoid(g)
    dg = gh * u * s * (1 + g * (1 - s))  # d silu(g)/dg = s + g s (1 - s)
    du = gh * g * s
    dxg, dwg, drg, dcg, _ = linear_grads(x, wg, bg, r, c, dg)
    dxu, dwu, dru, dcu, _ = linear_grads(x, wu, bu, r, c, du)
    return dxg + dxu, dwg, dwu, drg + dru, dcg + dcu


# ----- §4: carriers -------------------------------------------------------------------------------


def carrier_weight(base, delta, rows, cols):
    """The carrier's dense weight: B with Δ added at (rows × cols)."""
    w = base.clone()
    if rows.numel() and cols.numel():
        w[rows.long()[:, None], cols.long()[None, :]] += delta
    return w


def carrier_linear(x, base, delta, rows, cols, bias=None):
    w = carrier_weight(base, delta, rows, cols)
    y = _flat(x) @ w.t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], base.shape[0])


def carrier_linear_dx(x, base, delta, rows, cols, gy):
    """∂L/∂x = G W (the carrier's dense weight)."""
    return (_flat(gy) @ carrier_weight(base, delta, rows, cols)).reshape(x.shape)


def _token_weights(base, carriers, ids):
    """The dense weight of each distinct id (−1, a missing or None carrier: the base)."""
    out = {}
    for i in set(ids.tolist()):
        item = carriers[i] if 0 <= i < len(carriers) else None
        out[i] = base if item is None else carrier_weight(base, *item)
    return out


def bank_linear(x, base, carriers, ids, bias=None):
    """Token t through the carrier ``ids[t]`` (ids outside the list or of a None carrier: base)."""
    X = _flat(x)
    y = X.new_zeros(X.shape[0], base.shape[0])
    ws = _token_weights(base, carriers, ids)
    for t, i in enumerate(ids.tolist()):
        y[t] = ws[i] @ X[t]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], base.shape[0])


def bank_linear_dx(x, base, carriers, ids, gy):
    G = _flat(gy)
    dx = G.new_zeros(G.shape[0], base.shape[1])
    ws = _token_weights(base, carriers, ids)
    for t, i in enumerate(ids.tolist()):
        dx[t] = G[t] @ ws[i]
    return dx.reshape(x.shape)


# ----- §5: the eraser's channel gather ------------------------------------------------------------


def gather(hidden, positions, channels):
    """out[b, j] = hidden[b, positions[b], channels[j]]."""
    out = hidden.new_zeros(hidden.shape[0], channels.numel())
    for bi, p in enumerate(positions.tolist()):
        for j, ch in enumerate(channels.tolist()):
            out[bi, j] = hidden[bi, p, ch]
    return out


def gather_grad(hidden, positions, channels, gout):
    """The gather's adjoint: gout scattered into zeros, repeated channels accumulating."""
    gh = torch.zeros(hidden.shape, dtype=gout.dtype)
    for bi, p in enumerate(positions.tolist()):
        for j, ch in enumerate(channels.tolist()):
            gh[bi, p, ch] += gout[bi, j]
    return gh
