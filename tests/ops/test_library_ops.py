"""The registered ops (torch.ops.lcdd.*) pass torch.library.opcheck: schema (no undeclared
mutation or aliasing), autograd registration, fake implementations against the real ones
(shapes, dtypes and strides), and AOT dispatch with dynamic shapes, forward and backward.

Samples: fp32 and fp16, odd shapes, every differentiable input with and without grad, soft and
binary masks, empty and full carriers, carrier ids mixing −1 and several carriers, every CPU
backend (Triton under the interpreter). benchmarks/gpu_check.sh runs this file on CUDA too."""

from __future__ import annotations

import pytest
import torch

from lcdd_kernels import _backend
from lcdd_kernels.ops.carrier import CarrierTable
from tests.helpers.devices import DEVICES

OPS = ["masked_delta_linear", "masked_delta_linear_backward", "masked_delta_swiglu", "masked_delta_swiglu_backward",
       "masked_delta_swiglu_backward_", "carrier_linear", "bank_linear", "gather_channels", "gather_channels_out"]
LINEAR_BACKENDS = ["torch", "triton"]
CARRIER_BACKENDS = ["torch", "triton"] + (["cpp"] if _backend.native_available() else [])


def _device_backends(device, backends):
    if device == "cuda":
        return [b for b in backends if b != "cpp"] + (["cuda"] if _backend.native_has_cuda() else [])
    return backends


def _opcheck(op, args):
    # raises with the failing test's name; the returned dict says which utils ran
    result = torch.library.opcheck(op, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


def test_every_public_op_is_registered_in_one_namespace():
    import lcdd_kernels.ops  # noqa: F401 (registers the ops)

    for name in OPS:
        packet = getattr(torch.ops.lcdd, name)
        assert isinstance(packet, torch._ops.OpOverloadPacket), name
        schema = str(packet.default._schema)
        assert schema.startswith(f"lcdd::{name}("), schema
    # the per-device kernels are registered (the dispatcher picks them; nothing falls back)
    for name in ("masked_delta_linear", "masked_delta_swiglu", "carrier_linear", "bank_linear", "gather_channels"):
        op = getattr(torch.ops.lcdd, name).default
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)


def _masks(n, k, kind, dtype, device, g):
    if kind == "soft":
        return (torch.randn(n, generator=g).to(device, dtype), torch.randn(k, generator=g).to(device, dtype))
    return ((torch.rand(n, generator=g) > 0.4).to(device, dtype), (torch.rand(k, generator=g) > 0.4).to(device, dtype))


def _interpreted_extra(backend, device, kind, grads) -> bool:
    """Triton on CPU runs in the interpreter, which is slow: there, only the first (full) case of
    each masked-delta opcheck runs per dtype; on CUDA every case does."""
    return backend == "triton" and device == "cpu" and (kind, grads) != ("soft", (True,) * 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_opcheck_masked_delta_linear(device, dtype, backend):
    g = torch.Generator().manual_seed(1)
    n, k = 13, 11
    # every differentiable input with and without grad, soft and binary masks, bias on and off
    cases = [("soft", True, (True,) * 5), ("binary", False, (False, True, False, True, False)),
             ("soft", False, (True, False, True, False, False)), ("binary", True, (False, False, False, False, True)),
             ("binary", True, (False,) * 5)]
    for kind, bias_on, grads in cases:
        if _interpreted_extra(backend, device, kind, grads):
            continue
        x = torch.randn(2, 3, k, generator=g).to(device, dtype)
        w = torch.randn(n, k, generator=g).to(device, dtype)
        b = torch.randn(n, k, generator=g).to(device, dtype)
        r, c = _masks(n, k, kind, dtype, device, g)
        bias = torch.randn(n, generator=g).to(device, dtype) if bias_on else None
        for t, want in zip((x, w, r, c, bias), grads):
            if t is not None:
                t.requires_grad_(want)
        _opcheck(torch.ops.lcdd.masked_delta_linear.default, (x, w, b, r, c, bias, backend))
        gy = torch.randn(2, 3, n, generator=g).to(device, dtype)
        _opcheck(torch.ops.lcdd.masked_delta_linear_backward.default,
                 (gy, x.detach(), w.detach(), b, r.detach(), c.detach(), list(grads[:4]), backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_opcheck_masked_delta_swiglu(device, dtype, backend):
    g = torch.Generator().manual_seed(2)
    f, k = 10, 7
    for kind, grads in (("soft", (True,) * 5), ("binary", (False, True, True, False, True)),
                        ("soft", (True, False, False, True, False))):
        if _interpreted_extra(backend, device, kind, grads):
            continue
        x = torch.randn(5, k, generator=g).to(device, dtype)
        ws = [torch.randn(f, k, generator=g).to(device, dtype) * 0.5 for _ in range(4)]
        r, c = _masks(f, k, kind, dtype, device, g)
        for t, want in zip((x, ws[0], ws[2], r, c), grads):
            t.requires_grad_(want)
        # gu_scratch=False: opcheck compares gu after backward, which gu_scratch=True lets
        # backward overwrite (the public masked_delta_swiglu drops gu and passes True)
        _opcheck(torch.ops.lcdd.masked_delta_swiglu.default, (x, *ws, r, c, backend, False))
        h, gu = torch.ops.lcdd.masked_delta_swiglu(x.detach(), *[w.detach() for w in ws], r.detach(), c.detach(),
                                                   backend, False)
        dh = torch.randn_like(h)
        det = [x.detach(), *[w.detach() for w in ws], r.detach(), c.detach()]
        _opcheck(torch.ops.lcdd.masked_delta_swiglu_backward.default, (dh, *det, gu, list(grads), backend))
        _opcheck(torch.ops.lcdd.masked_delta_swiglu_backward_.default, (dh, *det, gu.clone(), list(grads), backend))


def _carrier_parts(n, k, kind, dtype, device, g):
    """(delta, rows, cols) int32: a random subset, an empty carrier, or a full one."""
    if kind == "empty_rows":
        rows, cols = torch.empty(0, dtype=torch.int32), torch.tensor([1, 4], dtype=torch.int32)
    elif kind == "empty":
        rows, cols = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)
    elif kind == "full":
        rows, cols = torch.arange(n, dtype=torch.int32), torch.arange(k, dtype=torch.int32)
    else:
        rows = torch.nonzero(torch.rand(n, generator=g) > 0.5).flatten().to(torch.int32)
        cols = torch.nonzero(torch.rand(k, generator=g) > 0.5).flatten().to(torch.int32)
    delta = torch.randn(rows.numel(), cols.numel(), generator=g)
    return delta.to(device, dtype), rows.to(device), cols.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_carrier_linear(device, dtype):
    g = torch.Generator().manual_seed(3)
    n, k = 9, 7
    for backend in _device_backends(device, CARRIER_BACKENDS):
        for kind, bias_on in (("subset", True), ("empty", False), ("empty_rows", True), ("full", False)):
            if backend == "triton" and device == "cpu" and (kind, bias_on) not in (("subset", True), ("empty", False)):
                continue
            x = torch.randn(3, 2, k, generator=g).to(device, dtype).requires_grad_(True)
            base = torch.randn(n, k, generator=g).to(device, dtype)
            bias = torch.randn(n, generator=g).to(device, dtype) if bias_on else None
            delta, rows, cols = _carrier_parts(n, k, kind, dtype, device, g)
            _opcheck(torch.ops.lcdd.carrier_linear.default, (x, base, delta, rows, cols, bias, backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_bank_linear(device, dtype):
    """Slots: a carrier, an empty slot, a full carrier, an empty carrier, another carrier; ids
    mix −1 and several carriers (and the empty ones), or None (slot 0 everywhere)."""
    g = torch.Generator().manual_seed(4)
    n, k = 11, 6
    for backend in _device_backends(device, CARRIER_BACKENDS):
        entries = []
        for kind in ("subset", None, "full", "empty", "subset"):
            if kind is None:
                entries.append(None)
                continue
            delta, rows, cols = _carrier_parts(n, k, kind, dtype, device, g)
            entries.append(CarrierTable.entry(delta, rows, cols, n, slots=backend == "cuda"))
        table = CarrierTable(n, k, entries, torch.device(device))
        cases = [([0, -1, 2, 4, 4, 3, -1, 0], True), (None, False)]
        if backend == "torch":
            cases += [([-1] * 8, False), ([2] * 8, False)]
        for ids, bias_on in cases:
            x = torch.randn(8, k, generator=g).to(device, dtype).requires_grad_(True)
            base = torch.randn(n, k, generator=g).to(device, dtype)
            bias = torch.randn(n, generator=g).to(device, dtype) if bias_on else None
            cid = None if ids is None else torch.tensor(ids, dtype=torch.int32, device=device)
            _opcheck(torch.ops.lcdd.bank_linear.default,
                     (x, base, bias, cid, table.views, table.deltas, table.rows, table.cols, table.max_rows, backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_gather_channels(device, dtype):
    g = torch.Generator().manual_seed(5)
    # Triton here on CUDA only: under the interpreter its loads go through host copies of the
    # inputs' storages, which opcheck's schema-check wrappers do not provide (a crash, not a
    # result); test_gather.py checks the interpreter's numbers
    backends = ["torch"] + (["cpp"] if device == "cpu" and _backend.native_available() else ["triton"])
    for backend in backends:
        hidden = torch.randn(5, 3, 9, generator=g).to(device, dtype).transpose(0, 1).detach().requires_grad_(True)
        positions = torch.tensor([4, 0, 2], device=device)
        channels = torch.tensor([8, 1, 1, 5], dtype=torch.int32, device=device)
        _opcheck(torch.ops.lcdd.gather_channels.default, (hidden, positions, channels, backend))
        out = torch.empty(4, 3, dtype=dtype, device=device).t()  # strided out
        _opcheck(torch.ops.lcdd.gather_channels_out.default, (hidden.detach(), positions, channels, out, backend))


def test_sync_free_torch_routing_equals_the_routed_one():
    """The torch backend's GPU path (every slot on every token, kept where the id matches: no host
    sync) and the CPU path (tokens grouped by slot) give the same result, here on CPU tensors;
    ids outside the table (unchecked) add nothing on both."""
    from lcdd_kernels.ops import carrier as C

    g = torch.Generator().manual_seed(6)
    n, k, t = 9, 7, 11
    parts = [_carrier_parts(n, k, kind, torch.float32, "cpu", g) for kind in ("subset", "full", "empty", "subset")]
    deltas, rows, cols = ([p[i] for p in parts] for i in range(3))
    x = torch.randn(t, k, generator=g)
    ids = torch.tensor([0, -1, 1, 3, 3, 2, 9, -5, 0, 1, 3], dtype=torch.int32)
    y0 = torch.randn(t, n, generator=g)
    a, b = y0.clone(), y0.clone()
    C._torch_add_routed_(a, x, deltas, rows, cols, ids)
    C._torch_add_masked_(b, x, deltas, rows, cols, ids)
    torch.testing.assert_close(b, a)
    assert not torch.equal(a, y0)
    assert torch.equal(a[6], y0[6]) and torch.equal(a[7], y0[7]) and torch.equal(a[1], y0[1])
    tok, seg = C.route(ids, len(deltas), t, torch.device("cpu"))
    assert seg.tolist() == [3, 5, 7, 8, 11]  # −1 and the out-of-range ids first, then slot by slot
