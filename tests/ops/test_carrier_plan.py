"""CarrierPlan, the prepared carrier path: it refuses at preparation what the checked ops refuse per
call, and computes what they compute (float64 references; fp32 and bf16; odd shapes; empty
carriers; mixed slot ids with −1 and ids outside the plan)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels import _backend
from lcdd_kernels.ops.carrier import bank_linear_ref
from lcdd_kernels.ops.carrier_plan import FUSED_MAX_TOKENS, CarrierPlan

from tests.helpers.compare import assert_close

# (T, N, K): one token, a few (dot path), one token chunk, above the fp32 fused limit (GEMM + add),
# odd and prime sizes
SHAPES = [(1, 37, 29), (3, 16, 64), (16, 45, 33), (FUSED_MAX_TOKENS + 21, 70, 50)]


def _carriers(n, k, seed=0):
    """Sparse, empty rows, (slot 2: None), full, one index."""
    g = torch.Generator().manual_seed(seed)

    def pick(m, p):
        return torch.nonzero(torch.rand(m, generator=g) < p).flatten()

    out = []
    for rows, cols in ((pick(n, 0.3), pick(k, 0.4)), (torch.zeros(0, dtype=torch.long), pick(k, 0.5)),
                       (torch.arange(n), torch.arange(k)), (torch.tensor([n - 1]), torch.tensor([0]))):
        out.append((torch.randn(rows.numel(), cols.numel(), generator=g) / max(cols.numel(), 1) ** 0.5,
                    rows.to(torch.int32), cols))
    out.insert(2, None)
    return out


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cast(carriers, dtype):
    return [None if c is None else (c[0].to(dtype), c[1], c[2]) for c in carriers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_plan_equals_checked_op(t, n, k, dtype, bias):
    g = torch.Generator().manual_seed(t * 7 + n)
    x64, w64 = torch.randn(t, k, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64)
    b64 = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    c64 = _cast(_carriers(n, k), torch.float64)
    # −1, every slot (empty ones included), and ids outside the plan (they mean −1 there)
    ids = torch.tensor([(i % (len(c64) + 3)) - 1 for i in range(t)], dtype=torch.int32)
    in_range = ids.masked_fill(ids >= len(c64), -1)
    x, w = x64.to(dtype), w64.to(dtype)
    b = b64.to(dtype) if bias else None
    cd = _cast(c64, dtype)
    # the reference on the inputs as the kernels see them (rounded once to dtype), and PyTorch's own
    # run in dtype as the baseline of the bound: the checked op runs the same native code as the
    # plan, so it cannot be the baseline (a bug the two share would widen the bound to cover it)
    ref = bank_linear_ref(x.double(), w.double(), _cast(cd, torch.float64), in_range,
                          None if b is None else b.double())
    lowp = bank_linear_ref(x, w, cd, in_range, b)
    plan = CarrierPlan(w, cd)
    with torch.no_grad():
        got = plan(x, w, b, ids)
        got64 = plan(x, w, b, ids.long())  # int64 ids, converted per call
    bank = L.CarrierBank("cpu", dtype)
    for i, c in enumerate(_cast(c64, dtype)):
        bank.add({"p": c if c is not None else (torch.zeros(0, 0, dtype=dtype), torch.zeros(0, dtype=torch.long),
                                                torch.zeros(0, dtype=torch.long))})
    checked = L.bank_linear(x, w, bank, "p", in_range, b)
    assert_close(f"plan {dtype} T={t}", got, ref, lowp=lowp)
    assert torch.equal(got, got64)
    assert_close(f"checked {dtype} T={t}", checked, ref, lowp=lowp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_without_ids_is_carrier_linear(dtype):
    n, k = 33, 47
    delta, rows, cols = _carriers(n, k, seed=3)[0]
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 3, k, generator=g), torch.randn(n, k, generator=g)
    x, w, delta = x.to(dtype), w.to(dtype), delta.to(dtype)
    want = L.carrier_linear(x, w, delta, rows, cols, backend="reference")
    got = CarrierPlan(w, [(delta, rows, cols), _cast(_carriers(n, k), dtype)[3]])(x, w)  # no ids: slot 0 on every token
    ref = L.carrier_linear(x.double(), w.double(), delta.double(), rows, cols, backend="reference")
    assert got.shape == (2, 3, n)
    assert_close(f"plan slot 0 {dtype}", got, ref, lowp=want)


def test_plan_empty_and_no_tokens():
    w = torch.randn(6, 5)
    plan = CarrierPlan(w, [])
    x = torch.randn(4, 5)
    assert torch.allclose(plan(x, w, None, torch.full((4,), -1, dtype=torch.int32)), x @ w.t(), atol=1e-5)
    assert plan(torch.randn(0, 5), w, None, torch.zeros(0, dtype=torch.int32)).shape == (0, 6)
    shaped = CarrierPlan((6, 5), [None], device="cpu", dtype=torch.float32)
    assert torch.allclose(shaped(x, w), x @ w.t(), atol=1e-5)


def test_plan_gradient_to_x_through_the_op():
    n, k = 9, 7
    c = _carriers(n, k)
    w = torch.randn(n, k, dtype=torch.float64)
    x = torch.randn(3, k, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, -1, 3], dtype=torch.int32)
    plan = CarrierPlan(w, _cast(c, torch.float64))
    plan(x, w, None, ids).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    bank_linear_ref(x2, w, _cast(c, torch.float64), ids).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-10)


# ------------------------------------------------------------------------------------ refusals

N, K = 8, 6


def _bad_cases():
    d = torch.randn(2, 2)
    r, c = torch.tensor([1, 4]), torch.tensor([0, 5])
    return {
        "unsorted rows": (d, torch.tensor([4, 1]), c),
        "repeated cols": (d, r, torch.tensor([3, 3])),
        "row out of range": (d, torch.tensor([1, N]), c),
        "negative col": (d, r, torch.tensor([-1, 2])),
        "float indices": (d, r.float(), c),
        "2-D rows": (d, r[None], c),
        "delta shape": (torch.randn(3, 2), r, c),
        "integer delta": (d.long(), r, c),
        "indices on another device": (d, r.to("meta"), c),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_plan_refuses_what_the_checked_op_refuses(case):
    delta, rows, cols = _bad_cases()[case]
    w, x = torch.randn(N, K), torch.randn(2, K)
    with pytest.raises((ValueError, TypeError)) as checked:
        L.carrier_linear(x, w, delta, rows, cols)
    with pytest.raises(type(checked.value)):
        CarrierPlan(w, [None, (delta, rows, cols)])


def test_plan_call_refuses_mismatched_arguments():
    w = torch.randn(N, K)
    plan = CarrierPlan(w, [(torch.randn(1, 1), torch.tensor([2]), torch.tensor([3]))])
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        plan(torch.randn(2, K + 1), w)
    with pytest.raises(ValueError, match="slot_ids must have shape"):
        plan(torch.randn(2, K), w, None, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype="):
        plan(torch.randn(2, K, dtype=torch.float64), w.double())
    with pytest.raises(ValueError, match="contiguous"):
        plan(torch.randn(2, K), torch.randn(K, N).t())
    with pytest.raises(TypeError, match="slot_ids must be int32"):
        plan(torch.randn(2, K), w, None, torch.zeros(2))
    with pytest.raises(ValueError, match="device= and dtype="):
        CarrierPlan((N, K), [])


@pytest.mark.skipif(not _backend.native_available(), reason="needs lcdd_kernels._C")
def test_plan_calls_no_tensor_reduction(monkeypatch):
    """The per-call path reads no index: no reduction or host read of a tensor happens."""
    w = torch.randn(N, K)
    plan = CarrierPlan(w, [(torch.randn(2, 2), torch.tensor([1, 4]), torch.tensor([0, 5]))])
    x, ids = torch.randn(3, K), torch.tensor([0, -1, 0], dtype=torch.int32)
    want = plan(x, w, None, ids)
    for name in ("any", "all", "item", "tolist", "min", "max", "cpu", "nonzero"):
        def refuse(*a, _name=name, **kw):
            raise AssertionError(f"Tensor.{_name} called per call")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad():
        got = plan(x, w, None, ids)
    monkeypatch.undo()
    assert torch.equal(got, want)


def test_bank_model_uses_the_plan():
    bank = L.CarrierBank("cpu", torch.float32, shapes={"p": (N, K)})
    cid = bank.add({"p": (torch.randn(2, 2), torch.tensor([1, 4]), torch.tensor([0, 5]))})
    plan = bank.plan("p", (N, K))
    assert isinstance(plan, CarrierPlan) and len(plan) == 1 and bank.plan("p", (N, K)) is plan
    bank.remove(cid)
    assert bank.plan("p", (N, K)) is not plan  # rebuilt when the bank changes


def test_plan_16bit_prefill_on_a_cpu_with_a_bf16_gemm(monkeypatch):
    """Where the CPU has a native bf16 GEMM, 16-bit prefill runs it and then the carrier add."""
    from lcdd_kernels.ops import carrier_plan

    monkeypatch.setattr(carrier_plan, "_native_16bit_gemm", lambda: True)
    t, n, k = FUSED_MAX_TOKENS + 5, 23, 31
    g = torch.Generator().manual_seed(9)
    x64, w64 = torch.randn(t, k, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64)
    c64 = _cast(_carriers(n, k), torch.float64)
    ids = torch.tensor([(i % len(c64)) - 1 for i in range(t)], dtype=torch.int32)
    plan = CarrierPlan(w64.bfloat16(), _cast(c64, torch.bfloat16))
    assert plan._fused_max == FUSED_MAX_TOKENS
    with torch.no_grad():
        got = plan(x64.bfloat16(), w64.bfloat16(), None, ids)
    assert_close("plan bf16 GEMM + add", got, bank_linear_ref(x64, w64, c64, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("t,n,k", SHAPES + [(5, 300, 260)])
def test_add_is_the_carriers_alone(t, n, k, dtype):
    """add_: what an engine that computed the base itself gets (vLLM's CPU build)."""
    g = torch.Generator().manual_seed(t + 3 * n)
    x = torch.randn(t, k, generator=g, dtype=torch.float64).to(dtype)
    base = torch.randn(t, n, generator=g, dtype=torch.float64).to(dtype)
    cd = _cast(_carriers(n, k, seed=t), dtype)
    ids = torch.tensor([(i % (len(cd) + 3)) - 1 for i in range(t)], dtype=torch.int32)
    in_range = ids.masked_fill(ids >= len(cd), -1)
    zero = torch.zeros(n, k, dtype=torch.float64)
    ref = base.double() + bank_linear_ref(x.double(), zero, _cast(cd, torch.float64), in_range)
    lowp = base + bank_linear_ref(x, zero.to(dtype), cd, in_range)
    out = base.clone()
    assert CarrierPlan((n, k), cd, device="cpu", dtype=dtype).add_(out, x, ids) is out
    assert_close(f"add_ {dtype} T={t}", out, ref, lowp=lowp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_carrier", [1, 2, 3, 4, 5, 16])
def test_add_blocks_of_tokens_and_rows(per_carrier, dtype):
    """add_ with each carrier's tokens of a chunk in every block the kernel has (1-4 tokens share a
    read of the delta rows, 5+ the 16-lane micro-kernel), carriers of more rows than one task
    (x gathered once per thread and reused across its row blocks, tasks of other carriers in
    between), column counts on and off the vector width, tokens interleaved across carriers."""
    n, k = 203, 83
    g = torch.Generator().manual_seed(per_carrier)
    cols = [torch.arange(k), torch.arange(0, k, 2), torch.arange(1, 17), torch.tensor([5, 40, 41])]
    cd = []
    for i, c in enumerate(cols):
        rows = torch.nonzero(torch.rand(n, generator=g) < 0.8 - 0.15 * i).flatten().to(torch.int32)
        cd.append((torch.randn(rows.numel(), c.numel(), generator=g, dtype=torch.float64).to(dtype), rows, c))
    ids = torch.tensor([i % 4 for i in range(4 * per_carrier)] + [-1], dtype=torch.int32)
    x = torch.randn(ids.numel(), k, generator=g, dtype=torch.float64).to(dtype)
    base = torch.randn(ids.numel(), n, generator=g, dtype=torch.float64).to(dtype)
    zero = torch.zeros(n, k, dtype=torch.float64)
    ref = base.double() + bank_linear_ref(x.double(), zero, _cast(cd, torch.float64), ids)
    lowp = base + bank_linear_ref(x, zero.to(dtype), cd, ids)
    for threads in (1, 2):
        with _threads(threads):
            out = base.clone()
            CarrierPlan((n, k), cd, device="cpu", dtype=dtype).add_(out, x, ids)
        assert_close(f"add_ {dtype} {per_carrier} tokens per carrier, {threads} threads", out, ref, lowp=lowp)


def test_add_refuses_what_it_cannot_do():
    n, k = 12, 10
    plan = CarrierPlan((n, k), _carriers(n, k), device="cpu", dtype=torch.float32)
    out, x, ids = torch.zeros(3, n), torch.randn(3, k), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="out must be"):
        plan.add_(torch.zeros(3, n + 1), x, ids)
    with pytest.raises(ValueError, match="slot_ids"):
        plan.add_(out, x, ids[:2])
    with pytest.raises(TypeError, match="int32"):
        plan.add_(out, x, ids.long())
    with pytest.raises(TypeError, match="float32"):
        plan.add_(out.double(), x.double(), ids)


def test_plan_keeps_its_own_indices():
    """The plan checked the indices once: a caller's later edit of its tensors must not reach it."""
    n, k = 16, 8
    delta, rows, cols = torch.randn(2, 3), torch.tensor([1, 4], dtype=torch.int32), torch.tensor([0, 2, 5])
    w, x = torch.randn(n, k), torch.randn(2, k)
    ids = torch.tensor([0, -1], dtype=torch.int32)
    plan = CarrierPlan(w, [(delta, rows, cols)])
    with torch.no_grad():
        before = plan(x, w, None, ids)
        rows[1], cols[2] = 12, 7
        assert torch.equal(plan(x, w, None, ids), before)


def test_plan_takes_a_row_with_stride_zero():
    """A (1, K) view with row stride 0 (an expand) is contiguous to torch, not to the kernel."""
    n, k = 9, 7
    w, row = torch.randn(n, k), torch.randn(k)
    plan = CarrierPlan(w, _carriers(n, k))
    ids = torch.tensor([0], dtype=torch.int32)
    x = row.as_strided((1, k), (0, 1))
    with torch.no_grad():
        got = plan(x, w, None, ids)
        out = torch.zeros(1, n)
        plan.add_(out, x, ids)
    want = bank_linear_ref(row[None].double(), w.double(), _cast(_carriers(n, k), torch.float64), ids)
    assert_close("stride-0 row", got, want)
    assert_close("stride-0 row add_", out, want - row[None].double() @ w.double().t())


@pytest.mark.parametrize("t", [3, FUSED_MAX_TOKENS + 5])
@pytest.mark.parametrize("layout", ["3d", "3d-transposed", "2d-padded", "1d"])
def test_plan_reads_every_layout_of_x(t, layout):
    """The CPU call passes x's own pointer and row stride where it can: contiguous (..., K), rows
    padded apart; anything else is copied once. Every layout gives the reference."""
    n, k = 23, 19
    g = torch.Generator().manual_seed(t)
    w = torch.randn(n, k, generator=g)
    cs = _carriers(n, k, seed=t)
    if layout == "3d":
        x = torch.randn(t, 1, k, generator=g)
    elif layout == "3d-transposed":
        x = torch.randn(1, t, k, generator=g).transpose(0, 1)
    elif layout == "2d-padded":
        x = torch.randn(t, k + 6, generator=g)[:, 3:3 + k]
    else:
        x = torch.randn(k, generator=g)
    tokens = x.numel() // k
    ids = torch.tensor([(i % 6) - 1 for i in range(tokens)], dtype=torch.int32)
    with torch.no_grad():
        got = CarrierPlan(w, cs)(x, w, None, ids)
    want = bank_linear_ref(x.reshape(tokens, k).double(), w.double(), _cast(cs, torch.float64), ids)
    assert got.shape == (*x.shape[:-1], n)
    assert_close(f"{layout} T={tokens}", got.reshape(tokens, n), want)


@pytest.mark.skipif(not _backend.native_available(), reason="needs lcdd_kernels._C")
def test_plan_follows_use_backend_per_call(monkeypatch):
    """Outside any use_backend context the call skips the thread-local lookup; inside one, the
    forced backend runs (not the native call), and the count of open contexts returns to zero."""
    from lcdd_kernels.ops import _native

    n, k = 12, 10
    w, x = torch.randn(n, k), torch.randn(2, k)
    ids = torch.tensor([0, -1], dtype=torch.int32)
    plan = CarrierPlan(w, _carriers(n, k))
    want = bank_linear_ref(x.double(), w.double(), _cast(_carriers(n, k), torch.float64), ids)
    with torch.no_grad():
        assert_close("native", plan(x, w, None, ids), want)
        lib = _native.lib()

        class NoNative:
            def __getattr__(self, name):
                if name.startswith("carrier_linear") or name.startswith("carrier_add"):
                    raise AssertionError(f"{name} called under use_backend('torch')")
                return getattr(lib, name)

        monkeypatch.setattr(_native, "lib", lambda: NoNative())
        with L.use_backend("torch"):
            assert_close("torch backend", plan(x, w, None, ids), want)
    assert _backend._contexts == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [
    [0] * 6 + [1] * 5 + [-1] * 5,          # two carriers above the few-token path in one chunk, and base tokens
    [3, 0, 3, 3, 0, 3, 3, 9, 3, 3, 1, 3, 3],  # one carrier's many tokens around others', one id out of range
    [1] * 16,                                # a whole chunk on one slot: no compaction
    [4, -1, 0, 3, 1, 3, 4, 0, 1, -1, 3, 4, 0, 1, 4, 3],  # four carriers, a few tokens each
])
def test_fused_chunk_of_mixed_carriers(ids, dtype):
    """Inside one 16-token chunk each carrier computes only its own tokens (compacted lanes)."""
    n, k = 41, 35
    g = torch.Generator().manual_seed(len(ids))
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(len(ids), k, generator=g).to(dtype)
    cs = _cast(_carriers(n, k, seed=2), dtype)
    ids = torch.tensor(ids, dtype=torch.int32)
    in_range = ids.masked_fill(ids >= len(cs), -1)
    with torch.no_grad():
        got = CarrierPlan(w, cs)(x, w, None, ids)
    ref = bank_linear_ref(x.double(), w.double(), _cast(cs, torch.float64), in_range)
    assert_close(f"mixed chunk {dtype}", got, ref, lowp=bank_linear_ref(x, w, cs, in_range))
