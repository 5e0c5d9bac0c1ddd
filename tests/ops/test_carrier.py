"""carrier_linear and bank_linear: every backend against SPEC §4 in float64, gradients to x, the
bank's bookkeeping, the package without lcdd_kernels._C, and the errors users see."""

from __future__ import annotations

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels import _backend
from lcdd_kernels.ops.carrier import bank_linear_ref, carrier_linear_ref

from tests.helpers.devices import HAS_CUDA
from tests.helpers.compare import assert_close

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = (["torch", "reference", "triton"] + (["cpp"] if _backend.native_available() and not HAS_CUDA else [])
            + (["cuda"] if HAS_CUDA and _backend.native_has_cuda() else []))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# (T, N, K): one token, decode-sized, tile edges, prefill-sized; odd and prime sizes
SHAPES = [(1, 37, 29), (5, 16, 64), (17, 45, 33), (130, 70, 50), (300, 23, 19)]
# carrier kinds: (rows density, cols density); 0 = empty side, 1 = full side
KINDS = {"sparse": (0.3, 0.3), "full": (1.0, 1.0), "no-rows": (0.0, 0.5), "no-cols": (0.5, 0.0),
         "one": (-1, -1), "dense-rows": (1.0, 0.2)}


def pick(n, density, gen):
    if density == -1:  # a single index: the last one (tile edge)
        return torch.tensor([n - 1]) if n else torch.zeros(0, dtype=torch.long)
    return torch.nonzero(torch.rand(n, generator=gen) < density).flatten() if density < 1 else torch.arange(n)


def make_carrier(n, k, kind="sparse", seed=0, idx_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    dr, dc = KINDS[kind]
    rows, cols = pick(n, dr, gen).to(idx_dtype), pick(k, dc, gen).to(idx_dtype)
    delta = torch.randn(rows.numel(), cols.numel(), generator=gen) / max(cols.numel(), 1) ** 0.5
    return delta, rows, cols


def make_x(t, n, k, seed=1, lead=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (t,)), k, generator=gen)
    return x, torch.randn(n, k, generator=gen) / k**0.5, torch.randn(n, generator=gen)


def to(ts, dtype, device=DEVICE):
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in ts]


def dense_ref(x, base, delta, rows, cols, bias=None):
    """SPEC §4 as one dense weight, W = B with W[rows, cols] += Δ: independent of the ops'
    references, so that the ``reference`` backend is checked against something else too."""
    w = base.clone()
    w[rows.long()[:, None], cols.long()[None, :]] += delta
    return torch.nn.functional.linear(x, w, bias)


def dense_bank_ref(x, base, carriers, ids, bias=None):
    """Token t through ``dense_ref`` with carrier ``ids[t]`` (-1 or a None carrier: the base)."""
    plain = torch.nn.functional.linear(x, base, bias)
    rows = [plain[t] if i < 0 or carriers[i] is None else dense_ref(x[t], base, *carriers[i], bias)
            for t, i in enumerate(ids.tolist())]
    return torch.stack(rows) if rows else plain


def skip_slow(backend, t):
    if backend == "triton" and not HAS_CUDA and t > 130:
        pytest.skip("the Triton interpreter is slow; T=130 covers multi-tile token grids")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_carrier_linear_matches_spec(backend, dtype, shape):
    t, n, k = shape
    skip_slow(backend, t)
    for i, kind in enumerate(KINDS):
        x, base, bias = make_x(t, n, k, seed=i)
        delta, rows, cols = make_carrier(n, k, kind, seed=i, idx_dtype=torch.int32 if i % 2 else torch.int64)
        use_bias = bias if i % 3 else None
        ref = dense_ref(*to((x, base, delta), torch.float64), rows.to(DEVICE), cols.to(DEVICE),
                        None if use_bias is None else use_bias.to(DEVICE, torch.float64))
        args = to((x, base, delta, rows, cols), dtype)
        b = None if use_bias is None else use_bias.to(DEVICE, dtype)
        lowp = carrier_linear_ref(*args, b)
        out = L.carrier_linear(*args, b, backend=backend)
        assert out.dtype == dtype
        assert_close(f"{backend} {kind}", out, ref, lowp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_strided_x(backend):
    _, base, bias = make_x(0, 40, 24)
    x = torch.randn(2, 3, 48)[..., ::2]  # a non-unit column stride
    delta, rows, cols = make_carrier(40, 24, "sparse")
    args = to((x, base, delta, rows, cols, bias), torch.float32)
    ref = dense_ref(*to((x, base, delta, rows, cols, bias), torch.float64))
    out = L.carrier_linear(*args, backend=backend)
    assert out.shape == (2, 3, 40)
    assert_close(backend, out, ref, carrier_linear_ref(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_to_x(backend):
    dtype = torch.float32 if backend == "cuda" else torch.float64
    x, base, bias = make_x(7, 30, 22)
    delta, rows, cols = make_carrier(30, 22, "sparse")
    x1 = x.to(DEVICE, dtype).requires_grad_(True)
    x2 = x.to(DEVICE, torch.float64).requires_grad_(True)
    w = to((base, delta, rows, cols, bias), dtype)
    gy = torch.randn(7, 30, generator=torch.Generator().manual_seed(5))
    L.carrier_linear(x1, *w, backend=backend).backward(gy.to(DEVICE, dtype))
    dense_ref(x2, *to((base, delta, rows, cols, bias), torch.float64)).backward(gy.to(DEVICE, torch.float64))
    assert_close(f"{backend} dx", x1.grad, x2.grad)


# ----- many carriers per batch --------------------------------------------------------------------


def make_bank(n, k, kinds=("sparse", "full", "no-rows", "one"), dtype=torch.float32, device=DEVICE):
    bank = L.CarrierBank(device=device, dtype=dtype)
    carriers = []
    for i, kind in enumerate(kinds):
        delta, rows, cols = make_carrier(n, k, kind, seed=10 + i)
        carriers.append((delta, rows, cols))
        assert bank.add({"proj": (delta, rows, cols)}, name=kind) == i
    return bank, carriers


ID_MIXES = {
    "mixed": lambda t, g: torch.randint(-1, 4, (t,), generator=g),
    "all-none": lambda t, g: torch.full((t,), -1),
    "all-same": lambda t, g: torch.full((t,), 1),
    "one-each": lambda t, g: torch.arange(t) % 5 - 1,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 9, 16, 130])
def test_bank_linear_matches_spec(backend, dtype, t):
    n, k = 45, 37
    skip_slow(backend, t)
    bank, carriers = make_bank(n, k, dtype=dtype)
    x, base, bias = make_x(t, n, k)
    for mix, make_ids in ID_MIXES.items():
        ids = make_ids(t, torch.Generator().manual_seed(t)).to(DEVICE)
        for id_dtype in (torch.int64, torch.int32):
            ref = dense_bank_ref(*to((x, base), torch.float64), [to(c, torch.float64) for c in carriers],
                                 ids, bias.to(DEVICE, torch.float64))
            xs, bs, bi = to((x, base, bias), dtype)
            lowp = bank_linear_ref(xs, bs, [to(c, dtype) for c in carriers], ids, bi)
            out = L.bank_linear(xs, bs, bank, "proj", ids.to(id_dtype), bi, backend=backend)
            assert_close(f"{backend} {mix}", out, ref, lowp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_add_remove_keeps_others(backend):
    n, k, t = 33, 26, 12
    bank, carriers = make_bank(n, k)
    x, base, _ = to(make_x(t, n, k), torch.float32)
    def delta_ptrs(ids):  # the addresses the kernels read (a captured CUDA graph keeps them)
        table = bank.table("proj", bank.device, bank.dtype, (n, k))
        return {i: table.deltas[i].data_ptr() for i in ids}

    ptrs = delta_ptrs(bank.ids)
    bank.remove("full")
    extra = make_carrier(n, k, "sparse", seed=99)
    assert bank.add({"proj": extra, "other": make_carrier(7, 5, "sparse")}, name="new") == 1  # the freed id
    bank.add({"other": make_carrier(7, 5, "full")})  # a carrier without this projection: base there
    assert delta_ptrs((0, 2, 3)) == {i: ptrs[i] for i in (0, 2, 3)}
    carriers[1] = extra
    ids = (torch.arange(t) % 6 - 1).to(DEVICE)
    ref = dense_bank_ref(x.double(), base.double(), [to(c, torch.float64) for c in carriers] + [None], ids)
    assert_close(backend, L.bank_linear(x, base, bank, "proj", ids, backend=backend), ref,
                 bank_linear_ref(x, base, [to(c, torch.float32) for c in carriers] + [None], ids))
    assert len(bank) == 5 and bank.names == ["sparse", "new", "no-rows", "one"] and "new" in bank


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_gradient_to_x(backend):
    dtype = torch.float32 if backend == "cuda" else torch.float64
    bank, carriers = make_bank(20, 18, dtype=dtype)
    x, base, bias = make_x(10, 20, 18)
    ids = (torch.arange(10) % 5 - 1).to(DEVICE)
    x1 = x.to(DEVICE, dtype).requires_grad_(True)
    x2 = x.to(DEVICE, torch.float64).requires_grad_(True)
    L.bank_linear(x1, *to((base,), dtype), bank, "proj", ids, bias.to(DEVICE, dtype), backend=backend).sum().backward()
    dense_bank_ref(x2, base.to(DEVICE, torch.float64), [to(c, torch.float64) for c in carriers], ids,
                   bias.to(DEVICE, torch.float64)).sum().backward()
    assert_close(f"{backend} dx", x1.grad, x2.grad)


# ----- hardening: any strides, degenerate shapes, unchecked ids -----------------------------------


def x_layouts(t, k, gen):
    """x of T tokens and K features in the layouts users pass, as (storage, view of it): zero
    strides (expand; the cpp backend refused them: "lcdd_carrier_add_cpu: invalid argument"),
    transposed, sliced."""
    return {
        "expanded": (torch.randn(1, k, generator=gen), lambda r: r.expand(t, k)),
        "expanded-one-row": (torch.randn(k, generator=gen), lambda r: r.expand(1, k)),  # T = 1, row stride 0
        "expanded-3d": (torch.randn(1, 1, k, generator=gen), lambda r: r.expand(2, t, k)),
        "expanded-middle": (torch.randn(2, 1, k, generator=gen), lambda r: r.expand(2, t, k)),
        "transposed": (torch.randn(k, t, generator=gen), lambda r: r.t()),
        "sliced": (torch.randn(t, 2 * k, generator=gen), lambda r: r[:, 1::2]),
        "row-sliced": (torch.randn(2 * t, k + 3, generator=gen), lambda r: r[::2, 2:2 + k]),  # row stride > K
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_x_strides(backend):
    n, k, t = 23, 19, 6
    _, base, bias = make_x(0, n, k)
    delta, rows, cols = make_carrier(n, k, "sparse")
    bank, carriers = make_bank(n, k)
    w, w64 = to((base, delta, rows, cols, bias), torch.float32), to((base, delta, rows, cols, bias), torch.float64)
    c32, c64 = [to(c, torch.float32) for c in carriers], [to(c, torch.float64) for c in carriers]
    for name, (storage, view) in x_layouts(t, k, torch.Generator().manual_seed(3)).items():
        for op in ("carrier", "bank"):
            x = view(storage.to(DEVICE).requires_grad_(True))  # a view: the op sees its strides
            x.retain_grad()
            x64 = x.detach().double().requires_grad_(True)
            ids = (torch.arange(x.numel() // k) % 5 - 1).to(DEVICE)
            if op == "carrier":
                out = L.carrier_linear(x, *w, backend=backend)
                ref, lowp = dense_ref(x64, *w64), carrier_linear_ref(x.detach(), *w)
            else:
                out = L.bank_linear(x, w[0], bank, "proj", ids, w[-1], backend=backend)
                ref = dense_bank_ref(x64.reshape(-1, k), w64[0], c64, ids, w64[-1]).reshape(out.shape)
                lowp = bank_linear_ref(x.detach(), w[0], c32, ids, w[-1])
            assert out.shape == x.shape[:-1] + (n,)
            assert_close(f"{backend} {op} {name}", out, ref, lowp)
            gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
            out.backward(gy)
            ref.backward(gy.double())
            assert_close(f"{backend} {op} dx {name}", x.grad, x64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,n,k", [(4, 5, 0), (4, 0, 6), (0, 5, 6), (0, 0, 0), (3, 0, 0), (1, 0, 1)])
def test_degenerate_shapes(backend, t, n, k):
    """No input features, no outputs, no tokens (K = 0 / N = 0 failed with "cannot reshape tensor
    of 0 elements" on torch and cpp): the right empty or zero answer, dx of x's shape."""
    dtype = torch.float32 if backend == "cuda" else torch.float64
    x, base, bias = to(make_x(t, n, k), dtype)
    bank, carriers = make_bank(n, k, dtype=dtype)
    ids = (torch.arange(t) % 5 - 1).to(DEVICE)
    for op in ("carrier", "bank"):
        for kind in ("sparse", "full"):
            xg = x.clone().requires_grad_(True)
            x64 = x.detach().double().clone().requires_grad_(True)
            if op == "carrier":
                carrier = to(make_carrier(n, k, kind), dtype)
                y = L.carrier_linear(xg, base, *carrier, bias, backend=backend)
                ref = dense_ref(x64, *to((base, *carrier, bias), torch.float64))
            else:
                y = L.bank_linear(xg, base, bank, "proj", ids, bias, backend=backend)
                ref = dense_bank_ref(x64, base.double(), [to(c, torch.float64) for c in carriers], ids, bias.double())
            assert y.shape == (t, n)
            assert_close(f"{backend} {op} {kind}", y, ref.detach())
            if k == 0:  # no input features: y = b exactly
                assert torch.equal(y.detach(), bias.expand(t, n))
            y.backward(torch.ones_like(y))
            ref.backward(torch.ones_like(ref))
            assert xg.grad.shape == (t, k)
            assert_close(f"{backend} {op} dx", xg.grad, x64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_ids_outside_the_bank_mean_the_base(backend):
    """check_ids=False (ids checked elsewhere, no host sync) is defined for every id: one outside
    [-1, slots) or of a removed carrier adds nothing (the base), on every backend alike. Before,
    torch raised a bincount error for -5 and ignored 99, cpp refused both, reference ignored both."""
    n, k = 21, 17
    bank, carriers = make_bank(n, k)  # ids 0..3
    bank.remove(2)
    carriers[2] = None
    ids = torch.tensor([-5, 0, 4, 1, 99, -1, 2, 3, -2, 3]).to(DEVICE)
    as_base = torch.where((ids >= -1) & (ids < 4), ids, -1)
    x, base, bias = to(make_x(ids.numel(), n, k), torch.float32)
    with pytest.raises(ValueError, match="carrier id -5 is not in the bank"):
        L.bank_linear(x, base, bank, "proj", ids, bias, backend=backend)
    wraps = ids.clone()
    wraps[0], wraps[4] = 2**32, 2**32 + 3  # int64 ids that are 0 and 3 once truncated to int32
    for id_dtype, given in ((torch.int64, ids), (torch.int32, ids), (torch.int64, wraps)):
        xg = x.clone().requires_grad_(True)
        x64 = x.detach().double().clone().requires_grad_(True)
        out = L.bank_linear(xg, base, bank, "proj", given.to(id_dtype), bias, backend=backend, check_ids=False)
        ref = dense_bank_ref(x64, base.double(), [None if c is None else to(c, torch.float64) for c in carriers],
                             as_base, bias.double())
        assert_close(backend, out, ref.detach(), bank_linear_ref(x, base, [None if c is None else to(c, torch.float32)
                                                                            for c in carriers], as_base, bias))
        out.sum().backward()
        ref.sum().backward()
        assert_close(f"{backend} dx", xg.grad, x64.grad)


def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast x arrives in the autocast dtype while the weights stay fp32 (as nn.Linear
    gets them): both ops cast the weights as F.linear would, instead of refusing the mix, and
    give what the same call on bf16 tensors gives (they raised 'base_weight has dtype
    torch.float32 but x has torch.bfloat16')."""
    n, k, t = 13, 11, 6
    x, base, bias = make_x(t, n, k)
    delta, rows, cols = make_carrier(n, k, "sparse")
    bank, _ = make_bank(n, k, dtype=torch.bfloat16, device="cpu")  # a bank serves one dtype
    ids = torch.arange(t) % 5 - 1
    bf = torch.bfloat16
    for backend in [b for b in BACKENDS if b != "triton"]:  # CPU autocast: CPU tensors
        want_c = L.carrier_linear(x.to(bf), base.to(bf), delta.to(bf), rows, cols, bias.to(bf), backend=backend)
        want_b = L.bank_linear(x.to(bf), base.to(bf), bank, "proj", ids, bias.to(bf), backend=backend)
        with torch.autocast("cpu", dtype=bf):
            h = x.to(bf)  # as a previous autocast op hands it on
            got_c = L.carrier_linear(h, base, delta, rows, cols, bias, backend=backend)
            got_b = L.bank_linear(h, base, bank, "proj", ids, bias, backend=backend)
        assert got_c.dtype == bf and got_b.dtype == bf, backend
        assert torch.equal(got_c, want_c), backend
        assert torch.equal(got_b, want_b), backend


# ----- dispatch and the package without _C -------------------------------------------------------


def test_auto_dispatch_without_native(monkeypatch):
    x, base, bias = make_x(3, 20, 16)
    delta, rows, cols = make_carrier(20, 16)
    ref = carrier_linear_ref(x, base, delta, rows, cols, bias)
    bank, carriers = make_bank(20, 16, device="cpu")
    ids = torch.tensor([0, -1, 3])
    monkeypatch.setattr(_backend, "native_available", lambda: False)
    assert torch.allclose(L.carrier_linear(x, base, delta, rows, cols, bias), ref, atol=1e-6)
    assert torch.allclose(L.bank_linear(x, base, bank, "proj", ids),
                          bank_linear_ref(x, base, carriers, ids), atol=1e-6)
    for name in ("cpp", "cuda"):
        with pytest.raises(ValueError, match=f"backend '{name}' cannot run here"):
            L.carrier_linear(x, base, delta, rows, cols, backend=name)
    from lcdd_kernels.ops import carrier_triton

    calls, triton_add = [], carrier_triton.carrier_add_
    monkeypatch.setattr(carrier_triton, "carrier_add_", lambda *a: calls.append(1) or triton_add(*a))
    monkeypatch.setenv("LCDD_BACKEND", "triton")  # the override reaches these ops too
    assert torch.allclose(L.carrier_linear(x, base, delta, rows, cols, bias), ref, atol=1e-5)
    assert calls == [1]


def test_native_entry_points_refuse_bad_tables():
    if not _backend.native_available():
        pytest.skip("lcdd_kernels._C not built")
    from lcdd_kernels import _C
    from lcdd_kernels.ops.carrier import CarrierTable

    x, base, _ = make_x(2, 8, 6)
    delta, rows, cols = torch.randn(2, 2), torch.tensor([5, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    table = CarrierTable(8, 6, [CarrierTable.entry(delta, rows, cols, 8, slots=False)], torch.device("cpu"))
    y = torch.empty(2, 8)
    with pytest.raises(RuntimeError, match="invalid argument"):  # unsorted rows, straight to the C API
        _C.carrier_linear_cpu(x.data_ptr(), 6, base.data_ptr(), 0, y.data_ptr(), 2, 8, 6, 0, table.views.data_ptr(), 1, 0)
    if not _C.has_cuda():
        with pytest.raises(RuntimeError, match="without CUDA"):
            _C.carrier_add_cuda(x.data_ptr(), 6, y.data_ptr(), 2, 8, 6, 0, table.views.data_ptr(), 1, 0, 0)


# ----- bad input --------------------------------------------------------------------------------


def test_carrier_linear_errors():
    x, base, bias = make_x(3, 10, 8)
    delta, rows, cols = torch.randn(2, 3), torch.tensor([1, 4]), torch.tensor([0, 2, 7])
    f = L.carrier_linear
    with pytest.raises(ValueError, match="rows must be sorted and unique"):
        f(x, base, delta, torch.tensor([4, 1]), cols)
    with pytest.raises(ValueError, match="cols must be sorted and unique"):
        f(x, base, delta, rows, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match=r"rows holds indices out of range \[0, 10\)"):
        f(x, base, delta, torch.tensor([1, 10]), cols)
    with pytest.raises(ValueError, match=r"cols holds indices out of range \[0, 8\)"):
        f(x, base, delta, rows, torch.tensor([-1, 2, 3]))
    with pytest.raises(TypeError, match="rows must be int32 or int64"):
        f(x, base, delta, rows.float(), cols)
    with pytest.raises(ValueError, match=r"delta must have shape \(2, 3\) \(\|rows\|, \|cols\|\)"):
        f(x, base, delta.t(), rows, cols)
    with pytest.raises(TypeError, match="delta has dtype torch.float16 but x has torch.float32"):
        f(x, base, delta.half(), rows, cols)
    with pytest.raises(ValueError, match="base_weight has K = 8"):
        f(x[:, :5], base, delta, rows, cols)
    with pytest.raises(ValueError, match=r"bias must have shape \(10\)"):
        f(x, base, delta, rows, cols, bias[:4])
    with pytest.raises(ValueError, match="delta is on meta but x is on cpu"):
        f(x, base, delta.to("meta"), rows, cols)
    with pytest.raises(ValueError, match="rows is on meta, expected cpu"):
        f(x, base, delta, rows.to("meta"), cols)
    with pytest.raises(ValueError, match="base_weight requires grad, but this op computes gradients for x only"):
        f(x, base.clone().requires_grad_(True), delta, rows, cols, backend="torch")
    with torch.no_grad():  # serving: fine
        f(x, base.clone().requires_grad_(True), delta, rows, cols, backend="torch")
    # the reference differentiates everything
    d = delta.clone().requires_grad_(True)
    f(x, base, d, rows, cols, backend="reference").sum().backward()
    assert d.grad is not None
    with pytest.raises(ValueError, match="unknown backend"):
        f(x, base, delta, rows, cols, backend="fast")


def test_bank_errors():
    bank, _ = make_bank(10, 8, device="cpu")
    x, base, _ = make_x(4, 10, 8)
    g = L.bank_linear
    with pytest.raises(ValueError, match="carrier id 4 is not in the bank"):
        g(x, base, bank, "proj", torch.tensor([0, 1, 4, -1]))
    with pytest.raises(ValueError, match="carrier id -2 is not in the bank"):
        g(x, base, bank, "proj", torch.tensor([0, 1, -2, -1]))
    bank.remove(1)
    with pytest.raises(ValueError, match="carrier id 1 is not in the bank"):
        g(x, base, bank, "proj", torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=r"carrier_ids must have shape \(4\)"):
        g(x, base, bank, "proj", torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="carrier_ids must be int32 or int64"):
        g(x, base, bank, "proj", torch.zeros(4))
    with pytest.raises(TypeError, match="the bank holds torch.float32 deltas but x is torch.float16"):
        g(x.half(), base.half(), bank, "proj", torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="indexes rows < 10"):  # the carrier does not fit this weight
        g(x, base[:6], bank, "proj", torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="delta must have shape"):
        bank.add({"proj": (torch.randn(3, 3), torch.tensor([0, 1]), torch.tensor([0, 1, 2]))})
    with pytest.raises(ValueError, match="rows must be sorted and unique"):
        bank.add({"proj": (torch.randn(2, 1), torch.tensor([1, 1]), torch.tensor([0]))})
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add({"proj": make_carrier(10, 8)}, name="sparse")
    with pytest.raises(KeyError, match="no carrier named 'nope'"):
        bank.remove("nope")
    with pytest.raises(KeyError, match="no carrier with id 1"):
        bank.remove(1)
    meta = L.CarrierBank(device="meta")
    with pytest.raises(ValueError, match="the bank holds its carriers on meta but x is on cpu"):
        g(x, base, meta, "proj", torch.full((4,), -1))


def test_package_works_without_the_extension():
    # A fresh interpreter in which lcdd_kernels._C cannot be imported (as after LCDD_SKIP_NATIVE=1).
    import subprocess
    import sys

    code = """
import sys
sys.modules["lcdd_kernels._C"] = None  # any import of it now raises ImportError
import torch, lcdd_kernels as L
from lcdd_kernels import _backend
from lcdd_kernels.ops.carrier import carrier_linear_ref
assert not _backend.native_available()
x, B = torch.randn(3, 8), torch.randn(5, 8)
d, r, c = torch.randn(2, 3), torch.tensor([1, 4]), torch.tensor([0, 2, 7])
assert torch.allclose(L.carrier_linear(x, B, d, r, c), carrier_linear_ref(x, B, d, r, c), atol=1e-6)
bank = L.CarrierBank()
bank.add({"p": (d, r, c)})
assert torch.allclose(L.bank_linear(x, B, bank, "p", torch.tensor([0, -1, 0])),
                      L.bank_linear(x, B, bank, "p", torch.tensor([0, -1, 0]), backend="reference"), atol=1e-6)
h = torch.randn(2, 4, 8)
assert torch.equal(L.gather_channels(h, torch.tensor([1, 3]), torch.tensor([0, 5])), h[[0, 1], [1, 3]][:, [0, 5]])
try:
    L.carrier_linear(x, B, d, r, c, backend="cpp")
except ValueError as e:
    assert "not built" in str(e)
else:
    raise AssertionError("cpp ran without _C")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
