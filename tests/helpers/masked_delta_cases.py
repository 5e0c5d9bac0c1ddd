"""Cases and runners shared by the masked-delta tests (tests/ops/test_masked_delta*.py)."""

from __future__ import annotations

import torch

import lcdd_kernels as L
from lcdd_kernels.ops.masked_delta import masked_delta_linear_ref

from tests.helpers.compare import assert_close
from tests.helpers.devices import HAS_CUDA

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_masks(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "ones":
        return torch.ones(n)
    if kind == "soft":
        return torch.rand(n, generator=gen) * 2 - 0.5  # real values, some negative, some > 1
    density = float(kind.split("-")[1])
    return (torch.rand(n, generator=gen) < density).float()


def make_case(lead, k, n, mask_kind="random-0.5", bias=True, equal=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    base = torch.randn(n, k, generator=gen) / k**0.5
    w = base.clone() if equal else base + torch.randn(n, k, generator=gen) / k**0.5
    r = make_masks(mask_kind, n, gen)
    c = make_masks(mask_kind, k, gen)
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, base, r, c, b


def run(fn, args, grad_idx, dtype, device, backend=None):
    """Cast args, run fn, backprop a fixed random cotangent; return (out, grads)."""
    cast = [None if a is None else a.to(device=device, dtype=dtype) for a in args]
    for i in grad_idx:
        if cast[i] is not None:
            cast[i] = cast[i].detach().requires_grad_(True)  # a leaf, strides kept
    kw = {} if backend is None else {"backend": backend}
    out = fn(*cast, **kw)
    gen = torch.Generator().manual_seed(123)
    gy = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    out.backward(gy)
    return out.detach(), [None if cast[i] is None else cast[i].grad for i in grad_idx]


def baseline(backend):
    """The low-precision run a backend's error is measured against (helpers.assert_close): SPEC
    written literally, except for the reference itself, which is measured against the torch
    backend (against itself its bound would be its own error, and it could not fail)."""
    return "torch" if backend == "reference" else "reference"


LIN_GRADS = [0, 1, 3, 4, 5]  # x, weight, row_mask, col_mask, bias
LIN_NAMES = ["x", "weight", "row_mask", "col_mask", "bias"]


def check_linear(backend, dtype, lead, k, n, mask_kind="random-0.5", bias=True, equal=False, noncontig=False):
    args = list(make_case(lead, k, n, mask_kind, bias, equal))
    # Round the inputs to the test dtype once, so every run sees the same numbers.
    args = [None if a is None else a.to(dtype) for a in args]
    ref_out, ref_grads = run(masked_delta_linear_ref, args, LIN_GRADS, torch.float64, "cpu")
    low_out, low_grads = run(L.masked_delta_linear, args, LIN_GRADS, dtype, DEVICE, baseline(backend))
    if noncontig:
        x = args[0]
        args[0] = x.transpose(-1, 0).contiguous().transpose(-1, 0) if x.dim() > 1 else x
        assert x.dim() == 1 or not args[0].is_contiguous()
    out, grads = run(L.masked_delta_linear, args, LIN_GRADS, dtype, DEVICE, backend)
    assert not noncontig or x.dim() == 1 or grads[0].shape == x.shape
    assert_close("y", out.cpu(), ref_out, low_out.cpu(), dtype)
    for name, g, rg, lg in zip(LIN_NAMES, grads, ref_grads, low_grads):
        if rg is None:
            assert g is None
            continue
        assert_close(f"d{name}", g.cpu(), rg, lg.cpu(), dtype)


SWI_GRADS = [0, 1, 3, 5, 6]
SWI_NAMES = ["x", "gate_weight", "up_weight", "hidden_mask", "read_mask"]


def make_swiglu(lead, k, f, mask_kind="random-0.5", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    gb = torch.randn(f, k, generator=gen) / k**0.5
    ub = torch.randn(f, k, generator=gen) / k**0.5
    gw = gb + torch.randn(f, k, generator=gen) / k**0.5
    uw = ub + torch.randn(f, k, generator=gen) / k**0.5
    return [x, gw, gb, uw, ub, make_masks(mask_kind, f, gen), make_masks(mask_kind, k, gen)]


def saved_non_input_tensors(fn, inputs):
    """Run fn(*inputs) and return the tensors autograd saved that do not share storage with an input."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    return out, [t for t in saved if t.untyped_storage().data_ptr() not in storages]
