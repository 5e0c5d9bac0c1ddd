"""masked_delta_linear / masked_delta_swiglu: every backend against SPEC §1 in float64."""

from __future__ import annotations

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.ops.masked_delta import masked_delta_swiglu_ref

from tests.helpers.compare import assert_close
from tests.helpers.masked_delta_cases import (
    DEVICE,
    DTYPES,
    SWI_GRADS,
    SWI_NAMES,
    baseline,
    check_linear,
    make_case,
    make_swiglu,
    run,
)

BACKENDS = ["torch", "triton", "reference"]

# (leading shape of x, K, N): tiny, odd, prime, crossing tile edges
SHAPES = [((1,), 1, 1), ((3,), 5, 7), ((123,), 431, 97), ((2, 5), 33, 65), ((17,), 64, 128)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", SHAPES, ids=str)
def test_linear_shapes(backend, dtype, lead, k, n):
    check_linear(backend, dtype, lead, k, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["zeros", "ones", "random-0.1", "random-0.9", "soft"])
def test_linear_masks(backend, mask_kind):
    check_linear(backend, torch.float32, (37,), 45, 29, mask_kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_weight_equals_base_no_bias_noncontiguous(backend):
    check_linear(backend, torch.float32, (9, 4), 21, 19, "random-0.5", bias=False, equal=True, noncontig=True)


@pytest.mark.parametrize("backend", ["torch"])
def test_linear_row_blocks(backend):
    # N·K above the single-block threshold: the torch backend works in 16 row blocks.
    check_linear(backend, torch.float32, (3,), 1001, 1100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_empty_batch(backend):
    x, w, base, r, c, b = make_case((0,), 6, 5)
    w.requires_grad_(True)
    y = L.masked_delta_linear(x, w, base, r, c, b, backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


# No input features, no outputs, no tokens (not "cannot reshape tensor of 0 elements" from the
# torch backend): the right empty or zero answer, and zero gradients of the right shapes.
DEGENERATE = [((4,), 0, 5), ((4,), 6, 0), ((0,), 6, 5), ((2, 3), 0, 0), ((0,), 0, 3), ((3, 0), 5, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,k,n", DEGENERATE, ids=str)
def test_linear_degenerate_shapes(backend, lead, k, n):
    check_linear(backend, torch.float32, lead, k, n)
    x, w, base, r, c, b = make_case(lead, k, n)
    for t in (x, w, r, c, b):
        t.requires_grad_(True)
    y = L.masked_delta_linear(x, w, base, r, c, b, backend=backend)
    assert y.shape == (*lead, n)
    if k == 0:  # no input features: y = b exactly
        assert torch.equal(y.detach(), b.detach().expand_as(y))
    y.backward(torch.ones_like(y))
    assert [t.grad.shape for t in (x, w, r, c, b)] == [x.shape, w.shape, r.shape, c.shape, b.shape]



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,f,mask_kind", [((1,), 1, 1, "ones"), ((2, 7), 33, 47, "random-0.5"),
                                                ((61,), 96, 130, "soft"), ((5,), 16, 24, "zeros")], ids=str)
def test_swiglu(backend, dtype, lead, k, f, mask_kind):
    args = [a.to(dtype) for a in make_swiglu(lead, k, f, mask_kind)]
    ref_out, ref_grads = run(masked_delta_swiglu_ref, args, SWI_GRADS, torch.float64, "cpu")
    low_out, low_grads = run(L.masked_delta_swiglu, args, SWI_GRADS, dtype, DEVICE, baseline(backend))
    out, grads = run(L.masked_delta_swiglu, args, SWI_GRADS, dtype, DEVICE, backend)
    assert_close("h", out.cpu(), ref_out, low_out.cpu(), dtype)
    for name, g, rg, lg in zip(SWI_NAMES, grads, ref_grads, low_grads):
        assert_close(f"d{name}", g.cpu(), rg, lg.cpu(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,k,f", DEGENERATE, ids=str)
def test_swiglu_degenerate_shapes(backend, lead, k, f):
    args = make_swiglu(lead, k, f)
    ref_out, ref_grads = run(masked_delta_swiglu_ref, args, SWI_GRADS, torch.float64, "cpu")
    out, grads = run(L.masked_delta_swiglu, args, SWI_GRADS, torch.float32, DEVICE, backend)
    assert out.shape == (*lead, f)
    assert_close("h", out.cpu(), ref_out, dtype=torch.float32)
    for name, g, rg in zip(SWI_NAMES, grads, ref_grads):
        assert_close(f"d{name}", g.cpu(), rg, dtype=torch.float32)


def test_torch_backend_gradcheck():
    x, w, base, r, c, b = [None if a is None else a.double() for a in make_case((2, 3), 5, 4, "soft")]
    for t in (x, w, r, c, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: L.masked_delta_linear(*a, backend="torch"), (x, w, base, r, c, b))
    args = [a.double() for a in make_swiglu((3,), 4, 6, "soft")]
    for i in SWI_GRADS:
        args[i].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: L.masked_delta_swiglu(*a, backend="torch"), tuple(args))


def test_base_weight_gets_no_gradient():
    x, w, base, r, c, b = make_case((4,), 6, 5)
    w.requires_grad_(True)
    L.masked_delta_linear(x, w, base, r, c, b, backend="torch").sum().backward()
    assert base.grad is None and w.grad is not None


def test_masks_may_have_another_float_dtype():
    x, w, base, r, c, b = make_case((4,), 6, 5, "soft")
    r64 = r.double().requires_grad_(True)
    y = L.masked_delta_linear(x, w, base, r64, c, b, backend="torch")
    y.sum().backward()
    assert y.dtype == torch.float32 and r64.grad.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_torch_backend_many_blocks(monkeypatch, dtype):
    # Force row and column blocking on small shapes: every block boundary path, in fp32 and fp16.
    from lcdd_kernels.ops import _blocks

    monkeypatch.setattr(_blocks, "SINGLE_BLOCK_NUMEL", 256)
    assert len(_blocks.row_blocks(70, 50)) > 4 and len(_blocks.row_blocks(50, 70)) > 4
    check_linear("torch", dtype, (13,), 50, 70)
    args = [a.to(dtype) for a in make_swiglu((11,), 50, 70, "soft")]
    ref_out, ref_grads = run(masked_delta_swiglu_ref, args, SWI_GRADS, torch.float64, "cpu")
    low_out, low_grads = run(L.masked_delta_swiglu, args, SWI_GRADS, dtype, "cpu", "reference")
    out, grads = run(L.masked_delta_swiglu, args, SWI_GRADS, dtype, "cpu", "torch")
    assert_close("h", out, ref_out, low_out, dtype)
    for name, g, rg, lg in zip(SWI_NAMES, grads, ref_grads, low_grads):
        assert_close(f"d{name}", g, rg, lg, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swiglu_backward_reuses_its_buffer_only_when_the_graph_is_dropped(backend):
    args = [a.to(DEVICE) for a in make_swiglu((5,), 12, 20, "soft")]
    for i in SWI_GRADS:
        args[i].requires_grad_(True)
    saved = []  # the (T, 2, F) buffer of g and u, as the Function saves it

    def pack(t):
        if t.shape == (5, 2, 20):
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = L.masked_delta_swiglu(*args, backend=backend)
    assert len(saved) == 1
    gu = saved[0].clone()
    h.sum().backward(retain_graph=True)
    assert torch.equal(saved[0], gu)  # a retained graph keeps its saved buffer intact
    first = [args[i].grad.clone() for i in SWI_GRADS]
    for i in SWI_GRADS:
        args[i].grad = None
    h.sum().backward()  # the saved (g, u) buffer survived the retained backward
    for a, i in zip(first, SWI_GRADS):
        assert torch.equal(a, args[i].grad)
    assert not torch.equal(saved[0], gu)  # the last backward wrote its gradients over it
    with pytest.raises(RuntimeError):  # and the graph is gone, as PyTorch reports
        h.sum().backward()
