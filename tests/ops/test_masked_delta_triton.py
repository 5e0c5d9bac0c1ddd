"""The Triton backend's two designs (fused GEMM epilogues / cuBLAS + element kernels), each forced
with LCDD_TRITON_DESIGN, against SPEC §1 in float64; plus the shape-based dispatch between them.

Under the interpreter the kernels use 64-wide tiles (with dW partial sums at 32), so the shapes
below include sizes on both sides of those edges."""

from __future__ import annotations

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.ops.masked_delta import masked_delta_linear_ref, masked_delta_swiglu_ref

from tests.helpers.compare import assert_close
from tests.helpers.masked_delta_cases import (
    DEVICE,
    DTYPES,
    LIN_GRADS,
    LIN_NAMES,
    SWI_GRADS,
    SWI_NAMES,
    check_linear,
    make_case,
    make_swiglu,
    run,
    saved_non_input_tensors,
)

M = pytest.importorskip("lcdd_kernels.ops.masked_delta_triton")


def _refuse(*_args, **_kwargs):
    raise AssertionError("the other Triton design ran")


@pytest.fixture(params=M.DESIGNS)
def design(request, monkeypatch):
    """Force one design and make the other one fail if it is ever called."""
    monkeypatch.setenv("LCDD_TRITON_DESIGN", request.param)
    for other in M.DESIGNS:
        if other != request.param:
            monkeypatch.setitem(M._IMPL, other, M._Design(_refuse, _refuse, _refuse))
    return request.param


def compare(names, out_name, out, ref_out, low_out, grads, ref_grads, low_grads, dtype):
    assert_close(out_name, out.cpu(), ref_out, low_out.cpu(), dtype)
    for name, g, rg, lg in zip(names, grads, ref_grads, low_grads):
        if rg is None:
            assert g is None, f"d{name} given for an input without a gradient"
            continue
        assert_close(f"d{name}", g.cpu(), rg, lg.cpu(), dtype)


# (leading shape of x, K, N): odd shapes, a 3-D x, and sizes around the 64 tile edges
SHAPES = [((1,), 1, 1), ((3,), 5, 7), ((123,), 431, 97), ((2, 5), 33, 65), ((65,), 128, 64), ((64,), 65, 129)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", SHAPES, ids=str)
def test_linear_shapes(design, dtype, lead, k, n):
    check_linear("triton", dtype, lead, k, n)


@pytest.mark.parametrize("mask_kind", ["zeros", "ones", "random-0.1", "random-0.5", "random-0.9", "soft"])
def test_linear_masks(design, mask_kind):
    check_linear("triton", torch.float32, (70,), 67, 80, mask_kind)


def test_linear_weight_equals_base_no_bias_noncontiguous(design):
    check_linear("triton", torch.float32, (9, 4), 21, 19, "random-0.5", bias=False, equal=True, noncontig=True)


@pytest.mark.parametrize("grad_idx", [[0], [1], [3, 4], [3], [4, 5]], ids=["x", "weight", "masks", "row", "col+bias"])
def test_linear_some_gradients(design, grad_idx):
    """Only the requested gradients are computed (dW is skipped when the weight is frozen)."""
    args = list(make_case((33,), 70, 66, "soft"))
    names = [LIN_NAMES[LIN_GRADS.index(i)] for i in grad_idx]
    ref = run(masked_delta_linear_ref, args, grad_idx, torch.float64, "cpu")
    low = run(L.masked_delta_linear, args, grad_idx, torch.float32, DEVICE, "reference")
    out = run(L.masked_delta_linear, args, grad_idx, torch.float32, DEVICE, "triton")
    compare(names, "y", out[0], ref[0], low[0], out[1], ref[1], low[1], torch.float32)


@pytest.fixture
def split_blocks(monkeypatch):
    """Force split with a block threshold small enough that these shapes take many blocks: row
    blocks of W_eff (forward), column blocks (dx), row blocks of P without dW, none a tile multiple."""
    from lcdd_kernels.ops import _blocks

    monkeypatch.setenv("LCDD_TRITON_DESIGN", "split")
    monkeypatch.setattr(_blocks, "SINGLE_BLOCK_NUMEL", 1024)
    assert len(_blocks.row_blocks(130, 150)) > 5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("frozen_weight", [False, True], ids=["trained", "frozen"])
def test_linear_split_blocks(split_blocks, frozen_weight, dtype):
    grad_idx = [0, 3, 4, 5] if frozen_weight else LIN_GRADS
    args = [a.to(dtype) for a in make_case((7,), 150, 130, "soft")]
    names = [LIN_NAMES[LIN_GRADS.index(i)] for i in grad_idx]
    ref = run(masked_delta_linear_ref, args, grad_idx, torch.float64, "cpu")
    low = run(L.masked_delta_linear, args, grad_idx, dtype, DEVICE, "reference")
    out = run(L.masked_delta_linear, args, grad_idx, dtype, DEVICE, "triton")
    compare(names, "y", out[0], ref[0], low[0], out[1], ref[1], low[1], dtype)


def test_empty_batch(design):
    x, w, base, r, c, b = make_case((0,), 6, 5, "soft")
    for t in (x, w, r, c, b):
        t.requires_grad_(True)
    y = L.masked_delta_linear(x, w, base, r, c, b, backend="triton")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 6)
    for t in (w, r, c, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
    args = make_swiglu((0,), 6, 5)
    for i in SWI_GRADS:
        args[i].requires_grad_(True)
    h = L.masked_delta_swiglu(*args, backend="triton")
    assert h.shape == (0, 5)
    h.sum().backward()
    for i in SWI_GRADS[1:]:
        assert torch.equal(args[i].grad, torch.zeros_like(args[i]))


def test_mask_gradients_are_deterministic(design):
    args = list(make_case((40,), 70, 66, "soft"))
    first = run(L.masked_delta_linear, args, LIN_GRADS, torch.float32, DEVICE, "triton")[1]
    second = run(L.masked_delta_linear, args, LIN_GRADS, torch.float32, DEVICE, "triton")[1]
    for name, a, b in zip(LIN_NAMES, first, second):
        assert torch.equal(a, b), f"d{name} differs between two identical runs"


def check_swiglu(dtype, lead, k, f, mask_kind="random-0.5"):
    args = [a.to(dtype) for a in make_swiglu(lead, k, f, mask_kind)]
    ref = run(masked_delta_swiglu_ref, args, SWI_GRADS, torch.float64, "cpu")
    low = run(L.masked_delta_swiglu, args, SWI_GRADS, dtype, DEVICE, "reference")
    out = run(L.masked_delta_swiglu, args, SWI_GRADS, dtype, DEVICE, "triton")
    compare(SWI_NAMES, "h", out[0], ref[0], low[0], out[1], ref[1], low[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,f,mask_kind", [((1,), 1, 1, "ones"), ((3,), 5, 7, "random-0.5"),
                                                ((2, 7), 33, 47, "random-0.9"), ((65,), 96, 130, "soft"),
                                                ((5,), 16, 24, "zeros")], ids=str)
def test_swiglu(design, dtype, lead, k, f, mask_kind):
    check_swiglu(dtype, lead, k, f, mask_kind)


def test_swiglu_split_blocks(split_blocks):
    check_swiglu(torch.float32, (7,), 150, 130, "soft")


def test_saves_no_weight_sized_tensor(design):
    n, k = 48, 40
    x, w, base, r, c, b = make_case((2, 3), k, n)
    for t in (x, w, r, c, b):
        t.requires_grad_(True)
    out, extra = saved_non_input_tensors(lambda *a: L.masked_delta_linear(*a, backend="triton"), (x, w, base, r, c, b))
    assert not extra, f"saved non-input tensors {[tuple(t.shape) for t in extra]}"
    args = make_swiglu((3,), k, n)
    for i in SWI_GRADS:
        args[i].requires_grad_(True)
    out, extra = saved_non_input_tensors(lambda *a: L.masked_delta_swiglu(*a, backend="triton"), args)
    assert [tuple(t.shape) for t in extra] == [(3, 2, n)], "SwiGLU keeps exactly one (T, 2, F) buffer"


# ---------------------------------------------------------------------------------------- dispatch

def test_dispatch_by_token_count(monkeypatch):
    monkeypatch.delenv("LCDD_TRITON_DESIGN", raising=False)
    cut = M.FUSED_MAX_TOKENS
    assert M.choose_design(1) == "fused" and M.choose_design(cut) == "fused"
    assert M.choose_design(cut + 1) == "split"
    monkeypatch.setenv("LCDD_TRITON_DESIGN", "split")
    assert M.choose_design(1) == "split"
    monkeypatch.setenv("LCDD_TRITON_DESIGN", " Fused ")
    assert M.choose_design(10**6) == "fused"
    monkeypatch.setenv("LCDD_TRITON_DESIGN", "auto")
    assert M.choose_design(cut + 1) == "split"


def test_dispatch_reaches_the_op(monkeypatch):
    """Without the override the token count picks the design, for forward and backward alike."""
    monkeypatch.delenv("LCDD_TRITON_DESIGN", raising=False)
    monkeypatch.setattr(M, "FUSED_MAX_TOKENS", 4)
    monkeypatch.setitem(M._IMPL, "fused", M._Design(_refuse, _refuse, _refuse))
    check_linear("triton", torch.float32, (5,), 6, 7)


def test_bad_design_is_named(monkeypatch):
    monkeypatch.setenv("LCDD_TRITON_DESIGN", "cublas")
    x, w, base, r, c, b = make_case((2,), 3, 4)
    with pytest.raises(ValueError, match="LCDD_TRITON_DESIGN='cublas'.*fused, split or auto"):
        L.masked_delta_linear(x, w, base, r, c, b, backend="triton")


# ----- float64 (the kernels accumulate in fp32: float64 is refused, not computed wrong) ------------


def _f64_case():
    x, w, base, r, c, b = [a.double() for a in make_case((4,), 8, 4, "soft")]
    return x.to(DEVICE), w.to(DEVICE), base.to(DEVICE), r.to(DEVICE), c.to(DEVICE), b.to(DEVICE)


def test_float64_is_refused_when_triton_is_asked_for(monkeypatch):
    x, w, base, r, c, b = _f64_case()
    swi = [a.double().to(DEVICE) for a in make_swiglu((3,), 8, 5)]
    words = r"float64.*backend='torch' or 'reference'"
    with pytest.raises(ValueError, match=words):
        L.masked_delta_linear(x, w, base, r, c, b, backend="triton")
    with pytest.raises(ValueError, match=words):
        L.masked_delta_swiglu(*swi, backend="triton")
    monkeypatch.setenv("LCDD_BACKEND", "triton")  # a request too, from the environment
    with pytest.raises(ValueError, match=words):
        L.masked_delta_linear(x, w, base, r, c, b)
    with L.use_backend("triton"), pytest.raises(ValueError, match=words):
        L.masked_delta_swiglu(*swi)


def test_float64_goes_to_torch_when_the_choice_is_automatic(monkeypatch):
    """On a GPU the automatic choice is Triton; here the selection is made to answer Triton the way
    it does on CUDA tensors. float64 must then run on the torch backend, float32 stays on Triton."""
    from lcdd_kernels import _backend

    real = _backend.select
    monkeypatch.delenv("LCDD_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "select", lambda op, dev, impl, auto, backend=None:
                        "triton" if backend is None and _backend.requested() is None else real(op, dev, impl, auto, backend))
    ran = []
    # the registered op's Triton path runs a design's forward (M._IMPL) for every call
    for design, impl in list(M._IMPL.items()):
        monkeypatch.setitem(M._IMPL, design, impl._replace(
            forward=lambda x2, *a, _fn=impl.forward: ran.append(x2.dtype) or _fn(x2, *a)))
    x, w, base, r, c, b = _f64_case()
    w.requires_grad_(True)
    y = L.masked_delta_linear(x, w, base, r, c, b)
    ref = masked_delta_linear_ref(x, w, base, r, c, b)
    assert (y - ref).abs().max().item() < 1e-12
    y.sum().backward()
    gw = w.grad.clone()
    w.grad = None
    ref.sum().backward()
    assert (gw - w.grad).abs().max().item() < 1e-12
    swi = [a.double().to(DEVICE) for a in make_swiglu((3,), 8, 5)]
    assert (L.masked_delta_swiglu(*swi) - masked_delta_swiglu_ref(*swi)).abs().max().item() < 1e-12
    assert ran == []  # neither float64 call reached the Triton kernels
    L.masked_delta_linear(*[a.float() for a in (x, w.detach(), base, r, c, b)])
    assert ran == [torch.float32]


def test_deprecated_module_functions_warn_and_run_the_registered_op():
    # masked_delta_triton.masked_delta_{linear,swiglu} are kept for old callers: each says what to
    # use instead and returns what the public function returns with backend="triton".
    x, w, base, r, c, b = make_case((3,), 9, 7)
    with pytest.warns(DeprecationWarning, match=r"lcdd_kernels.masked_delta_linear\(\.\.\., backend='triton'\)"):
        old = M.masked_delta_linear(x, w, base, r, c, b)
    assert torch.equal(old, L.masked_delta_linear(x, w, base, r, c, b, backend="triton"))
    args = make_swiglu((3,), 9, 7)
    with pytest.warns(DeprecationWarning, match=r"lcdd_kernels.masked_delta_swiglu\(\.\.\., backend='triton'\)"):
        old = M.masked_delta_swiglu(*args)
    assert torch.equal(old, L.masked_delta_swiglu(*args, backend="triton"))
