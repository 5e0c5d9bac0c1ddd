"""What the op keeps for backward, property tests over shapes, and the errors users see."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lcdd_kernels as L
from lcdd_kernels.ops.masked_delta import masked_delta_linear_ref

from tests.helpers.compare import assert_close
from tests.helpers.masked_delta_cases import DEVICE, make_case, make_swiglu, saved_non_input_tensors


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_saves_no_weight_sized_tensor(backend):
    n, k = 48, 40
    x, w, base, r, c, b = [a.to(DEVICE) for a in make_case((2, 3), k, n)]
    for t in (x, w, r, c, b):
        t.requires_grad_(True)
    out, extra = saved_non_input_tensors(
        lambda *a: L.masked_delta_linear(*a, backend=backend), (x, w, base, r, c, b))
    big = [tuple(t.shape) for t in extra if t.numel() >= n * k]
    assert not big, f"saved weight-sized tensors {big}"
    out.sum().backward()  # and backward still works from what was saved
    assert w.grad is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_swiglu_saves_no_weight_sized_tensor(backend):
    k, f = 40, 56
    args = [a.to(DEVICE) for a in make_swiglu((3,), k, f)]
    for i in (0, 1, 3, 5, 6):
        args[i].requires_grad_(True)
    out, extra = saved_non_input_tensors(lambda *a: L.masked_delta_swiglu(*a, backend=backend), args)
    big = [tuple(t.shape) for t in extra if t.numel() >= f * k]
    assert not big, f"saved weight-sized tensors {big}"
    # Gate and up activations are kept once: at most 2·T·F activation elements beyond the inputs.
    assert sum(t.numel() for t in extra) <= 2 * 3 * f + 2 * f + 2 * k
    out.sum().backward()


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(0, 9), k=st.integers(1, 40), n=st.integers(1, 40), bias=st.booleans(),
    density=st.sampled_from(["zeros", "ones", "random-0.3", "soft"]), seed=st.integers(0, 10_000),
)
def test_torch_backend_property(t, k, n, bias, density, seed):
    x, w, base, r, c, b = make_case((t,), k, n, density, bias, seed=seed)
    args64 = [None if a is None else a.double().requires_grad_(a is not base) for a in (x, w, base, r, c, b)]
    args32 = [None if a is None else a.float().requires_grad_(a is not base) for a in (x, w, base, r, c, b)]
    ref = masked_delta_linear_ref(*args64)
    out = L.masked_delta_linear(*args32, backend="torch")
    assert_close("y", out.detach(), ref.detach(), dtype=torch.float32, factor=0)
    ref.sum().backward()
    out.sum().backward()
    for i in (0, 1, 3, 4, 5):
        if args64[i] is not None:
            assert_close(f"grad{i}", args32[i].grad, args64[i].grad, dtype=torch.float32, factor=0)


# ------------------------------------------------------------------------------------------ errors

def good():
    x, w, base, r, c, b = make_case((3,), 5, 7)
    return dict(x=x, weight=w, base_weight=base, row_mask=r, col_mask=c, bias=b)


@pytest.mark.parametrize("field,value,exc,words", [
    ("x", torch.randn(3, 6), ValueError, ["x", "K = 5", "(3, 6)"]),
    ("weight", torch.randn(7, 6), ValueError, ["base_weight", "(7, 6)", "the shape of weight", "(7, 5)"]),
    ("base_weight", torch.randn(8, 5), ValueError, ["base_weight", "(7, 5)", "(8, 5)"]),
    ("row_mask", torch.ones(6), ValueError, ["row_mask", "(7)", "(6)"]),
    ("col_mask", torch.ones(7), ValueError, ["col_mask", "(5)", "(7)"]),
    ("col_mask", torch.ones(5, 1), ValueError, ["col_mask"]),
    ("bias", torch.randn(5), ValueError, ["bias", "(7)"]),
    ("weight", torch.randn(7, 5).double(), TypeError, ["weight", "float64", "float32"]),
    ("bias", torch.randn(7).half(), TypeError, ["bias", "float16"]),
    ("x", torch.randint(0, 3, (3, 5)), TypeError, ["x", "int64", "floating"]),
    ("row_mask", torch.ones(7, dtype=torch.bool), TypeError, ["row_mask", "bool"]),
    ("base_weight", torch.randn(7, 5).requires_grad_(True), ValueError, ["base_weight", "grad", "detach"]),
    ("x", "not a tensor", TypeError, ["x", "str"]),
    ("weight", torch.randn(35), ValueError, ["weight", "2-D"]),
])
def test_bad_input_names_the_problem(field, value, exc, words):
    kw = good()
    kw[field] = value
    with pytest.raises(exc) as info:
        L.masked_delta_linear(**kw, backend="torch")
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_bad_device_is_named():
    kw = good()
    kw["col_mask"] = kw["col_mask"].to("meta")
    with pytest.raises(ValueError, match="col_mask is on meta"):
        L.masked_delta_linear(**kw, backend="torch")


def test_swiglu_bad_shapes():
    args = make_swiglu((3,), 4, 6)
    args[3] = torch.randn(6, 5)
    with pytest.raises(ValueError, match="up_weight"):
        L.masked_delta_swiglu(*args, backend="torch")
    args = make_swiglu((3,), 4, 6)
    with pytest.raises(ValueError, match="hidden_mask"):
        L.masked_delta_swiglu(*args[:5], torch.ones(5), args[6], backend="torch")


# ---------------------------------------------------------------------------------------- dispatch

def test_backend_selection(monkeypatch):
    from lcdd_kernels import _backend

    dev = torch.device("cpu")
    impl, auto = ("triton", "torch", "reference"), ("triton", "torch")
    monkeypatch.delenv("LCDD_BACKEND", raising=False)
    assert _backend.select("op", dev, impl, auto) == "torch"  # CPU -> torch, even when interpreting
    monkeypatch.setenv("LCDD_BACKEND", "reference")
    assert _backend.select("op", dev, impl, auto) == "reference"
    with L.use_backend("torch"):
        assert _backend.select("op", dev, impl, auto) == "torch"
    assert _backend.select("op", dev, impl, auto, backend="torch") == "torch"
    monkeypatch.setenv("LCDD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        _backend.select("op", dev, impl, auto)
    monkeypatch.setenv("LCDD_BACKEND", "cpp")
    with pytest.raises(ValueError, match="not implemented for this op"):
        _backend.select("op", dev, impl, auto)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _backend.select("op", dev, impl, auto, backend="triton")
    L.set_backend("reference")
    try:
        monkeypatch.delenv("LCDD_BACKEND")
        assert _backend.select("op", dev, impl, auto) == "reference"
    finally:
        L.set_backend(None)


def test_backend_env_reaches_the_op(monkeypatch):
    kw = good()
    monkeypatch.setenv("LCDD_BACKEND", "reference")
    seen = []
    import lcdd_kernels.ops.masked_delta as md

    monkeypatch.setattr(md, "masked_delta_linear_ref", lambda *a: seen.append(1) or masked_delta_linear_ref(*a))
    L.masked_delta_linear(**kw)
    assert seen == [1]


def test_autocast_runs_in_the_autocast_dtype():
    kw = good()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.masked_delta_linear(**kw, backend="torch")
    assert y.dtype == torch.bfloat16
