"""Channel gather (activation capture): every backend against advanced indexing, gradients, out=
buffers, strided inputs and the errors users see."""

from __future__ import annotations

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels import _backend
from lcdd_kernels.ops.gather import gather_channels_ref

from tests.helpers.devices import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["triton", "torch", "reference"] + (["cpp"] if _backend.native_available() else [])
NATIVE = pytest.mark.skipif(not _backend.native_available(), reason="lcdd_kernels._C not built")


def by_rows(hidden, positions, channels):
    """The gather one row at a time, by plain indexing: independent of ``gather_channels_ref``
    (which the torch and reference backends run), so that those two are checked too."""
    return torch.stack([hidden[b, int(positions[b])][channels] for b in range(hidden.shape[0])])


def make(b, s, d, c, dtype=torch.float32, layout="contiguous", ch_dtype=torch.int64, device=DEVICE):
    if layout == "transposed":  # last two dims swapped: stride(2) != 1
        hidden = torch.randn(b, d, s, dtype=dtype, device=device).transpose(1, 2)
    elif layout == "sliced":  # a view into a wider, longer tensor
        hidden = torch.randn(b, s + 3, d + 5, dtype=dtype, device=device)[:, 2:s + 2, 1:d + 1]
    elif layout == "expanded":  # zero strides: one row and one position shared by all
        hidden = torch.randn(1, 1, d, dtype=dtype, device=device).expand(b, s, d)
    else:
        hidden = torch.randn(b, s, d, dtype=dtype, device=device)
    positions = torch.randint(0, s, (b,), device=device)
    channels = torch.randint(0, d, (c,), device=device, dtype=ch_dtype)  # unsorted, with repeats
    return hidden, positions, channels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "expanded"])
def test_forward_matches_indexing(backend, dtype, layout):
    if backend == "cpp" and DEVICE != "cpu":
        pytest.skip("cpp runs on CPU tensors")
    for (b, s, d, c), ch_dtype in (((3, 7, 37, 11), torch.int64), ((1, 1, 5, 5), torch.int32),
                                   ((5, 13, 130, 67), torch.int32)):
        hidden, pos, ch = make(b, s, d, c, dtype, layout, ch_dtype)
        out = L.gather_channels(hidden, pos, ch, backend=backend)
        assert out.dtype == dtype and out.shape == (b, c)
        # A gather copies bits: exact equality, not a tolerance.
        assert torch.equal(out, by_rows(hidden, pos, ch)), (b, s, d, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_is_filled_in_place(backend):
    if backend == "cpp" and DEVICE != "cpu":
        pytest.skip("cpp runs on CPU tensors")
    hidden, pos, ch = make(4, 9, 50, 21)
    store = torch.full((3, 4, 25), float("nan"), device=DEVICE)
    out = store[1, :, 2:23]  # strided (4, 21) view: row stride 25
    res = L.gather_channels(hidden, pos, ch, out=out, backend=backend)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, by_rows(hidden, pos, ch))
    assert torch.isnan(store[0]).all() and torch.isnan(store[2]).all()  # nothing else written
    assert torch.isnan(store[1, :, :2]).all() and torch.isnan(store[1, :, 23:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_scatters_into_zero_hidden(backend):
    if backend == "cpp" and DEVICE != "cpu":
        pytest.skip("cpp runs on CPU tensors")
    hidden, pos, ch = make(3, 6, 17, 9, torch.float64)
    ch[1] = ch[4]  # a repeated channel must accumulate
    pos[0] = pos[2]
    h1 = hidden.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    g = torch.randn(3, 9, dtype=torch.float64, device=DEVICE)
    (L.gather_channels(h1, pos, ch, backend=backend) * g).sum().backward()
    (by_rows(h2, pos, ch) * g).sum().backward()
    assert torch.equal(h1.grad, h2.grad)
    small = h1.detach()[:2, :3, :5].clone().requires_grad_(True)  # gradcheck runs one forward per element
    assert torch.autograd.gradcheck(lambda h: L.gather_channels(h, pos[:2] % 3, ch[:4] % 5, backend=backend), (small,))


def test_empty_batch_and_channels():
    hidden, pos, ch = make(3, 5, 8, 4)
    for backend in BACKENDS:
        if backend == "cpp" and DEVICE != "cpu":
            continue
        assert L.gather_channels(hidden, pos, ch[:0], backend=backend).shape == (3, 0)
        assert L.gather_channels(hidden[:0], pos[:0], ch, backend=backend).shape == (0, 4)


def test_auto_backend_and_missing_extension(monkeypatch):
    hidden, pos, ch = make(2, 4, 10, 3, device="cpu")
    ref = gather_channels_ref(hidden, pos, ch)
    monkeypatch.setattr(_backend, "native_available", lambda: False)
    assert torch.equal(L.gather_channels(hidden, pos, ch), ref)  # falls back to torch
    with pytest.raises(ValueError, match="not built"):
        L.gather_channels(hidden, pos, ch, backend="cpp")
    monkeypatch.setenv("LCDD_BACKEND", "reference")
    assert torch.equal(L.gather_channels(hidden, pos, ch), ref)


@NATIVE
def test_native_entry_point_checks_indices_itself():
    # The C API is callable without the Python checks (other programs link it): it must refuse
    # out-of-range indices rather than read out of bounds.
    from lcdd_kernels import _C

    hidden = torch.randn(2, 3, 4)
    pos = torch.tensor([0, 3])
    ch = torch.tensor([1, 2])
    out = torch.empty(2, 2)
    with pytest.raises(RuntimeError, match="invalid argument"):
        _C.gather_channels_cpu(hidden.data_ptr(), 0, 2, 3, 4, *hidden.stride(), pos.data_ptr(),
                               ch.data_ptr(), 1, 2, out.data_ptr(), 2, 1)


def test_errors():
    hidden, pos, ch = make(3, 5, 8, 4, device="cpu")
    g = L.gather_channels
    with pytest.raises(ValueError, match=r"positions holds indices out of range \[0, 5\)"):
        g(hidden, torch.tensor([0, 5, 1]), ch)
    with pytest.raises(ValueError, match="positions holds indices out of range"):
        g(hidden, torch.tensor([0, -1, 1]), ch)
    with pytest.raises(ValueError, match=r"channels holds indices out of range \[0, 8\)"):
        g(hidden, pos, torch.tensor([8]))
    with pytest.raises(TypeError, match="channels must be int32 or int64"):
        g(hidden, pos, ch.float())
    with pytest.raises(TypeError, match="positions must be int32 or int64"):
        g(hidden, pos.float(), ch)
    with pytest.raises(TypeError, match="hidden must be a floating-point"):
        g(hidden.long(), pos, ch)
    with pytest.raises(ValueError, match=r"hidden must be 3-D \(batch, seq, dim\)"):
        g(hidden[0], pos, ch)
    with pytest.raises(ValueError, match=r"positions must have shape \(3\)"):
        g(hidden, pos[:2], ch)
    with pytest.raises(ValueError, match="channels must be 1-D"):
        g(hidden, pos, ch[None])
    with pytest.raises(ValueError, match="channels is on meta"):
        g(hidden, pos, ch.to("meta"))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 4\)"):
        g(hidden, pos, ch, out=torch.empty(3, 5))
    with pytest.raises(TypeError, match="out has dtype torch.float16"):
        g(hidden, pos, ch, out=torch.empty(3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="out= cannot hold a result that requires grad"):
        g(hidden.requires_grad_(True), pos, ch, out=torch.empty(3, 4))
    with torch.no_grad():  # under no_grad the buffer is fine
        g(hidden, pos, ch, out=torch.empty(3, 4))
