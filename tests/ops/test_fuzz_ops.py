"""Differential fuzzing of every op on every backend that can run, against tests/helpers/oracle.py
(float64, written from docs/spec.md, independent of the ops' own references).

Random cases: shapes with 0 and 1 in every dimension, 1-D/2-D/3-D x, x contiguous, transposed,
sliced or expanded (zero strides), fp64 where the backend computes it, fp32 and fp16; binary,
soft, negative, all-zero and all-one masks, W == B, with and without bias; empty, partial and
full carriers; banks of several carriers (some removed) with ids mixing −1, every carrier and,
under ``check_ids=False``, ids outside the bank. Forward and every gradient (random or expanded
cotangent). Low precision is judged as helpers.assert_close does: error against the float64
oracle at most 3× that of the oracle's own formula run in the same dtype by plain PyTorch, plus
a small absolute slack.

Example counts: the hypothesis profile (tests/conftest.py: "ci" in `make test`, "fuzz" in
`make fuzz`) times a per-backend weight (the Triton interpreter is ~50x slower than the rest).
Every case that was checked completely is counted (tests/helpers/fuzz_report.py).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

import lcdd_kernels as L
from lcdd_kernels import _backend

from tests.helpers import oracle
from tests.helpers.devices import HAS_CUDA
from tests.helpers.fuzz_report import record
from tests.helpers.compare import assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"
F64, F32, F16 = torch.float64, torch.float32, torch.float16
NATIVE = _backend.native_available()

#: backend -> the dtypes it computes (bfloat16 only on a GPU: the interpreter's bf16 dot is wrong)
_LOWP = [F32, F16] + ([torch.bfloat16] if HAS_CUDA else [])
MD_BACKENDS = {"reference": [F64] + _LOWP, "torch": [F64] + _LOWP, "triton": _LOWP}
#: backend -> dtypes it must refuse with an error naming the backends that compute them
MD_REFUSED = {"triton": [F64]}
CARRIER_BACKENDS = {"reference": [F64] + _LOWP, "torch": [F64] + _LOWP, "triton": [F64] + _LOWP}
GATHER_BACKENDS = {"reference": [F64] + _LOWP, "torch": [F64] + _LOWP, "triton": [F64] + _LOWP}
if HAS_CUDA and _backend.native_has_cuda():
    CARRIER_BACKENDS["cuda"] = _LOWP
if NATIVE and not HAS_CUDA:
    CARRIER_BACKENDS["cpp"] = [F64] + _LOWP
    GATHER_BACKENDS["cpp"] = [F64] + _LOWP

#: examples per backend relative to the profile's max_examples
WEIGHT = {"triton": 0.5, "cuda": 1.0, "cpp": 1.5, "torch": 1.5, "reference": 1.0}


def examples(backend: str):
    n = settings.default.max_examples
    return settings(settings.default, max_examples=max(1, int(n * WEIGHT[backend])))


def cases(table):
    return [pytest.param(b, id=b) for b in table]


# ----- strategies -----------------------------------------------------------------------------

dim = st.one_of(st.sampled_from([0, 1]), st.integers(2, 40))
small = st.one_of(st.sampled_from([0, 1]), st.integers(2, 9))
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]
MASKS = ["binary", "soft", "negative", "zeros", "ones"]
seeds = st.integers(0, 2**31 - 1)


def randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


def lay_out(v: torch.Tensor, layout: str, grad: bool) -> torch.Tensor:
    """v's values in the requested memory layout, on DEVICE. ``expanded`` keeps only v's first
    entry along every leading dimension. With grad, x is a view of a leaf (built by
    differentiable ops) whose own gradient is kept: x.grad is the gradient of x, in x's shape."""
    make = None
    if layout == "transposed" and v.dim() >= 2:
        root, make = v.transpose(0, -1).contiguous(), lambda r: r.transpose(0, -1)  # last dim strided
    elif layout == "sliced" and v.dim() >= 1:
        root = torch.zeros(*v.shape[:-1], 2 * v.shape[-1] + 1, dtype=v.dtype)
        root[..., 1::2] = v
        make = lambda r: r[..., 1::2]  # noqa: E731  (offset storage, column stride 2)
    elif layout == "expanded" and v.dim() >= 2:
        root = v[(slice(0, 1),) * (v.dim() - 1)].clone()
        make = lambda r: r.expand(v.shape)  # noqa: E731  (zero strides over the leading dimensions)
    else:
        root = v.clone()
    root = root.to(DEVICE).requires_grad_(grad)
    if make is None:
        return root
    x = make(root)
    if grad:
        x.retain_grad()
    return x


@st.composite
def lead_shapes(draw):
    """The leading shape of x: () (a 1-D x), (T,) or (A, B)."""
    kind = draw(st.sampled_from(["1d", "2d", "2d", "3d"]))
    if kind == "1d":
        return ()
    if kind == "2d":
        return (draw(small),)
    return (draw(small), draw(st.integers(1, 4)))


def mask(kind, n, gen):
    if kind == "zeros":
        return torch.zeros(n, dtype=F64)
    if kind == "ones":
        return torch.ones(n, dtype=F64)
    u = torch.rand(n, generator=gen, dtype=F64)
    if kind == "binary":
        return (u < 0.5).to(F64)
    if kind == "soft":
        return u * 2 - 0.5
    return -u - 0.25  # negative


def materialise(x: torch.Tensor) -> torch.Tensor:
    """The expanded values (for the oracle's own runs)."""
    return x.detach().clone()


def cotangent(kind, shape, gen, dtype):
    if kind == "ones":  # what .sum().backward() passes: an expanded tensor, zero strides
        return torch.ones((), dtype=dtype).expand(shape)
    return randn(gen, *shape).to(dtype)


def leaf_view(v: torch.Tensor, layout: str, dtype, grad: bool) -> torch.Tensor:
    """``v`` rounded to dtype, then laid out (see lay_out)."""
    return lay_out(v.to(dtype), layout, grad)


def check(name, got, ref64, lowp, dtype):
    assert got is not None, f"{name}: no gradient"
    assert tuple(got.shape) == tuple(ref64.shape), f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    assert_close(name, got.detach().cpu(), ref64, None if dtype == F64 else lowp.detach().cpu(), dtype, factor=3.0)


# ----- masked_delta_linear / masked_delta_swiglu ---------------------------------------------------


@st.composite
def md_cases(draw, backend, swiglu=False):
    dtype = draw(st.sampled_from(MD_BACKENDS[backend] + MD_REFUSED.get(backend, [])))
    return dict(
        dtype=dtype, lead=draw(lead_shapes()), k=draw(dim), n=draw(dim), layout=draw(st.sampled_from(LAYOUTS)),
        rkind=draw(st.sampled_from(MASKS)), ckind=draw(st.sampled_from(MASKS)), equal=draw(st.booleans()),
        bias=False if swiglu else draw(st.booleans()), gy=draw(st.sampled_from(["random", "ones"])),
        seed=draw(seeds), design=draw(st.sampled_from(["fused", "split"])) if backend == "triton" else None,
    )


@contextlib.contextmanager
def triton_design(name):
    """Force the Triton masked-delta design (read at call time; saved for backward by the op)."""
    old = os.environ.get("LCDD_TRITON_DESIGN")
    if name is not None:
        os.environ["LCDD_TRITON_DESIGN"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LCDD_TRITON_DESIGN", None)
        else:
            os.environ["LCDD_TRITON_DESIGN"] = old


def md_values(case, n_weights):
    gen = torch.Generator().manual_seed(case["seed"])
    k, n = case["k"], case["n"]
    x = randn(gen, *case["lead"], k)
    pairs = []
    for _ in range(n_weights):
        b = randn(gen, n, k, scale=1 / max(k, 1) ** 0.5)
        w = b.clone() if case["equal"] else b + randn(gen, n, k, scale=1 / max(k, 1) ** 0.5)
        pairs.append((w, b))
    r, c = mask(case["rkind"], n, gen), mask(case["ckind"], k, gen)
    bias = randn(gen, n) if case.get("bias") else None
    return gen, x, pairs, r, c, bias


def refused(op, backend, dtype, fn, *args):
    """True (and checked) when ``backend`` must refuse ``dtype`` with a named error."""
    if dtype not in MD_REFUSED.get(backend, []):
        return False
    with pytest.raises(ValueError, match=r"float64.*backend='torch' or 'reference'"):
        fn(*args, backend=backend)
    record(f"{op}/{backend}/{str(dtype)[6:]}-refused")
    return True


def _leaves(dtype, *ts):
    return [None if t is None else t.to(DEVICE, dtype).requires_grad_(True) for t in ts]


@pytest.mark.parametrize("backend", cases(MD_BACKENDS))
def test_masked_delta_linear(backend):
    @examples(backend)
    @given(case=md_cases(backend))
    def run(case):
        note(repr(case))
        dtype = case["dtype"]
        gen, x64, [(w64, b64)], r64, c64, bias64 = md_values(case, 1)
        x = leaf_view(x64, case["layout"], dtype, grad=True)
        w, r, c, bias = _leaves(dtype, w64, r64, c64, bias64)
        base = b64.to(DEVICE, dtype)
        if refused("masked_delta_linear", backend, dtype, L.masked_delta_linear, x, w, base, r, c, bias):
            return
        with triton_design(case["design"]):
            y = L.masked_delta_linear(x, w, base, r, c, bias, backend=backend)
            gy = cotangent(case["gy"], y.shape, gen, dtype)
            y.backward(gy.to(DEVICE))
        exact = [materialise(x).double().cpu()] + [t.detach().double().cpu() for t in (w, base, r, c)]
        lowp = [materialise(x).cpu()] + [t.detach().cpu() for t in (w, base, r, c)]
        b_ex = None if bias is None else bias.detach().double().cpu()
        b_lp = None if bias is None else bias.detach().cpu()
        check("y", y, oracle.linear(*exact, b_ex), oracle.linear(*lowp, b_lp), dtype)
        want64 = oracle.linear_grads(*exact, gy.double())
        want_lp = oracle.linear_grads(*lowp, gy)
        for name, got, g64, glp in zip(("dx", "dW", "dr", "dc", "db"), (x.grad, w.grad, r.grad, c.grad,
                                       None if bias is None else bias.grad), want64, want_lp):
            if name == "db" and bias is None:
                continue
            check(name, got, g64, glp, dtype)
        record(f"masked_delta_linear/{backend}{'-' + case['design'] if case['design'] else ''}/{str(dtype)[6:]}")

    run()


@pytest.mark.parametrize("backend", cases(MD_BACKENDS))
def test_masked_delta_swiglu(backend):
    @examples(backend)
    @given(case=md_cases(backend, swiglu=True))
    def run(case):
        note(repr(case))
        dtype = case["dtype"]
        gen, x64, [(wg64, bg64), (wu64, bu64)], r64, c64, _ = md_values(case, 2)
        x = leaf_view(x64, case["layout"], dtype, grad=True)
        wg, wu, r, c = _leaves(dtype, wg64, wu64, r64, c64)
        bg, bu = bg64.to(DEVICE, dtype), bu64.to(DEVICE, dtype)
        if refused("masked_delta_swiglu", backend, dtype, L.masked_delta_swiglu, x, wg, bg, wu, bu, r, c):
            return
        with triton_design(case["design"]):
            h = L.masked_delta_swiglu(x, wg, bg, wu, bu, r, c, backend=backend)
            gh = cotangent(case["gy"], h.shape, gen, dtype)
            h.backward(gh.to(DEVICE))
        ts = (wg, bg, wu, bu, r, c)
        exact = [materialise(x).double().cpu()] + [t.detach().double().cpu() for t in ts]
        lowp = [materialise(x).cpu()] + [t.detach().cpu() for t in ts]
        check("h", h, oracle.swiglu(*exact), oracle.swiglu(*lowp), dtype)
        want64, want_lp = oracle.swiglu_grads(*exact, gh.double()), oracle.swiglu_grads(*lowp, gh)
        for name, got, g64, glp in zip(("dx", "dWg", "dWu", "dr", "dc"), (x.grad, wg.grad, wu.grad, r.grad, c.grad),
                                       want64, want_lp):
            check(name, got, g64, glp, dtype)
        record(f"masked_delta_swiglu/{backend}{'-' + case['design'] if case['design'] else ''}/{str(dtype)[6:]}")

    run()


# ----- carrier_linear / bank_linear ------------------------------------------------------------------

CARRIER_KINDS = ["empty-rows", "empty-cols", "partial", "full", "one"]


def carrier(kind, n, k, gen):
    def subset(m, p):
        return torch.nonzero(torch.rand(m, generator=gen) < p).flatten()

    if kind == "full":
        rows, cols = torch.arange(n), torch.arange(k)
    elif kind == "one":
        rows, cols = torch.arange(n)[-1:], torch.arange(k)[-1:]
    else:
        rows, cols = subset(n, 0.4), subset(k, 0.5)
        if kind == "empty-rows":
            rows = rows[:0]
        elif kind == "empty-cols":
            cols = cols[:0]
    return randn(gen, rows.numel(), cols.numel(), scale=1 / max(cols.numel(), 1) ** 0.5), rows, cols


@st.composite
def carrier_cases(draw, backend, bank=False):
    case = dict(
        dtype=draw(st.sampled_from(CARRIER_BACKENDS[backend])), lead=draw(lead_shapes()), k=draw(dim),
        n=draw(dim), layout=draw(st.sampled_from(LAYOUTS)), bias=draw(st.booleans()),
        gy=draw(st.sampled_from(["random", "ones"])), grad=draw(st.booleans()), seed=draw(seeds),
        idx=draw(st.sampled_from([torch.int32, torch.int64])),
    )
    if bank:
        case["kinds"] = draw(st.lists(st.sampled_from(CARRIER_KINDS), min_size=0, max_size=4))
        case["removed"] = draw(st.sets(st.integers(0, 3), max_size=2))
        case["unchecked"] = draw(st.booleans())  # check_ids=False, with ids outside the bank
    else:
        case["kind"] = draw(st.sampled_from(CARRIER_KINDS))
    return case


def _x_and_base(case, gen):
    k, n, dtype = case["k"], case["n"], case["dtype"]
    x64 = randn(gen, *case["lead"], k)
    base = randn(gen, n, k, scale=1 / max(k, 1) ** 0.5).to(DEVICE, dtype)
    bias = randn(gen, n).to(DEVICE, dtype) if case["bias"] else None
    grad = case["grad"]
    x = leaf_view(x64, case["layout"], dtype, grad=grad)
    return x, base, bias


def _finish_carrier(name, case, y, x, want, want_lp, dx_of, gen):
    dtype = case["dtype"]
    check("y", y, want, want_lp, dtype)
    if case["grad"]:
        gy = cotangent(case["gy"], y.shape, gen, dtype)
        y.backward(gy.to(DEVICE))
        check("dx", x.grad, dx_of(F64, gy.double()), dx_of(dtype, gy), dtype)
    record(f"{name}/{case['backend']}/{str(dtype)[6:]}")


@pytest.mark.parametrize("backend", cases(CARRIER_BACKENDS))
def test_carrier_linear(backend):
    @examples(backend)
    @given(case=carrier_cases(backend))
    def run(case):
        case["backend"] = backend
        note(repr(case))
        gen = torch.Generator().manual_seed(case["seed"])
        dtype = case["dtype"]
        x, base, bias = _x_and_base(case, gen)
        d64, rows, cols = carrier(case["kind"], case["n"], case["k"], gen)
        delta = d64.to(DEVICE, dtype)
        rows, cols = rows.to(DEVICE, case["idx"]), cols.to(DEVICE, case["idx"])
        y = L.carrier_linear(x, base, delta, rows, cols, bias, backend=backend)

        def args(dt):
            return ([materialise(x).to(dt).cpu(), base.to(dt).cpu(), delta.to(dt).cpu(), rows.cpu(), cols.cpu()],
                    None if bias is None else bias.to(dt).cpu())

        (a64, b64), (alp, blp) = args(F64), args(dtype)
        _finish_carrier("carrier_linear", case, y, x, oracle.carrier_linear(*a64, b64), oracle.carrier_linear(*alp, blp),
                        lambda dt, gy: oracle.carrier_linear_dx(*args(dt)[0], gy), gen)

    run()


@pytest.mark.parametrize("backend", cases(CARRIER_BACKENDS))
def test_bank_linear(backend):
    @examples(backend)
    @given(case=carrier_cases(backend, bank=True))
    def run(case):
        case["backend"] = backend
        note(repr(case))
        gen = torch.Generator().manual_seed(case["seed"])
        dtype, n, k = case["dtype"], case["n"], case["k"]
        x, base, bias = _x_and_base(case, gen)
        bank = L.CarrierBank(device=DEVICE, dtype=dtype)
        carriers = []
        for kind in case["kinds"]:
            d64, rows, cols = carrier(kind, n, k, gen)
            item = (d64.to(dtype), rows.to(case["idx"]), cols.to(case["idx"]))
            bank.add({"proj": item})
            carriers.append(item)
        for i in sorted(case["removed"]):
            if i < len(carriers):
                bank.remove(i)
                carriers[i] = None
        t = x.shape[:-1].numel()
        hi = len(carriers) + (3 if case["unchecked"] else 0)
        lo = -4 if case["unchecked"] else -1
        ids = torch.randint(lo, hi, (t,), generator=gen)
        if not case["unchecked"]:  # removed slots are invalid ids: -1 instead
            ids = torch.tensor([i if i < 0 or carriers[i] is not None else -1 for i in ids.tolist()],
                               dtype=torch.int64)
        ids = ids.to(case["idx"])
        if case["unchecked"] and case["idx"] == torch.int64:
            ids[::3] += 2**32  # ids that truncation to int32 would bring back into the bank
        y = L.bank_linear(x, base, bank, "proj", ids.to(DEVICE), bias, backend=backend,
                          check_ids=not case["unchecked"])

        def args(dt):
            cs = [None if c is None else (c[0].to(dt), c[1], c[2]) for c in carriers]
            return materialise(x).to(dt).cpu(), base.to(dt).cpu(), cs

        def want(dt):
            xx, bb, cs = args(dt)
            return oracle.bank_linear(xx, bb, cs, ids, None if bias is None else bias.to(dt).cpu())

        _finish_carrier("bank_linear", case, y, x, want(F64), want(dtype),
                        lambda dt, gy: oracle.bank_linear_dx(*args(dt), ids, gy), gen)

    run()


# ----- gather_channels ---------------------------------------------------------------------------------


@st.composite
def gather_cases(draw, backend):
    b = draw(small)
    s = draw(st.integers(0 if b == 0 else 1, 6))
    d = draw(st.integers(0, 12))
    return dict(
        dtype=draw(st.sampled_from(GATHER_BACKENDS[backend])), b=b, s=s, d=d,
        c=draw(st.integers(0, 10)) if d else 0, layout=draw(st.sampled_from(LAYOUTS)),
        grad=draw(st.booleans()), out=draw(st.sampled_from([None, "contiguous", "transposed"])),
        idx=draw(st.sampled_from([torch.int32, torch.int64])), gy=draw(st.sampled_from(["random", "ones"])),
        seed=draw(seeds),
    )


@pytest.mark.parametrize("backend", cases(GATHER_BACKENDS))
def test_gather_channels(backend):
    @examples(backend)
    @given(case=gather_cases(backend))
    def run(case):
        note(repr(case))
        gen = torch.Generator().manual_seed(case["seed"])
        dtype, b, s, d, c = case["dtype"], case["b"], case["s"], case["d"], case["c"]
        h64 = randn(gen, b, s, d)
        pos = torch.randint(0, max(s, 1), (b,), generator=gen).to(case["idx"])
        ch = torch.randint(0, max(d, 1), (c,), generator=gen).to(case["idx"])  # any order, repeats
        hidden = leaf_view(h64, case["layout"], dtype, grad=case["grad"])
        want = oracle.gather(materialise(hidden).double().cpu(), pos, ch)
        if case["grad"]:
            out = L.gather_channels(hidden, pos.to(DEVICE), ch.to(DEVICE), backend=backend)
        else:
            buf = None
            if case["out"] is not None:
                buf = torch.full((b, c), float("nan"), dtype=dtype, device=DEVICE)
                if case["out"] == "transposed":
                    buf = torch.full((c, b), float("nan"), dtype=dtype, device=DEVICE).t()
            out = L.gather_channels(hidden, pos.to(DEVICE), ch.to(DEVICE), out=buf, backend=backend)
            if buf is not None:
                assert out.data_ptr() == buf.data_ptr() or out.numel() == 0, "out= was not filled in place"
        # a gather is a copy: exact in every dtype
        check("out", out, want, want.to(dtype), dtype)
        assert torch.equal(out.detach().cpu().double(), want), "gather is a copy and must be exact"
        if case["grad"]:
            gy = cotangent(case["gy"], out.shape, gen, dtype)
            out.backward(gy.to(DEVICE))
            g64 = oracle.gather_grad(hidden, pos, ch, gy.double())
            check("dhidden", hidden.grad, g64, oracle.gather_grad(hidden, pos, ch, gy), dtype)
        record(f"gather_channels/{backend}/{str(dtype)[6:]}")

    run()
