"""The calls whose kernel launches the check records: every path of every Triton op's host code.

Each scenario calls a real launcher of the package (forward, and backward through autograd)
with small CPU tensors. Sizes are model-like: every model dimension and token count divisible by
16 (as hidden sizes, head dims and padded batches are), so integer arguments and the strides
derived from them get the divisibility specialisation a real launch gets; the weights are big
enough for the ``split`` design to cut them into row blocks (views at an offset, as on a GPU).
The branches the host code takes are enumerated here (design, bias, which gradients are needed,
TF32, token counts that pick tiles, index dtypes); which kernels, configs and constexprs follow
from them is left to the code under test.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch

DTYPES = ("float32", "float16", "bfloat16")

# Tokens, outputs, inputs of the masked-delta scenarios: N·K > the single-block limit of
# ops/_blocks.py, so the split design works on row blocks. Values are never read (the
# kernels do not run), so tensors are zeros and small: the host code's CPU GEMMs are
# what the recording costs.
_T, _N, _K = 16, 384, 256


@contextlib.contextmanager
def _env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _tf32(on: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


_DEVICE = "cpu"  # kernel_check.device runs the same scenarios on the GPU, for real


def _param(shape, dtype, grad):
    return torch.zeros(shape, dtype=dtype, device=_DEVICE).requires_grad_(grad)


def _masked_delta(dtype: torch.dtype):
    """The registered ops (what ``lcdd_kernels.masked_delta_linear`` / ``masked_delta_swiglu``
    call once they have checked the arguments and picked a backend) with backend "triton",
    forward and every backward path. Called directly: the public functions refuse Triton on CPU
    tensors without the interpreter, and the recording runs the host code for real with none."""
    from ..ops import masked_delta_triton as mdt

    ops = torch.ops.lcdd

    grads = list(itertools.product((False, True), repeat=3))  # weight(s), r, c
    for design, tf32 in itertools.product(mdt.DESIGNS, (False, True) if dtype == torch.float32 else (False,)):
        for (gw, gr, gc), bias in itertools.product(grads, (False, True)):
            name = f"masked_delta_linear design={design} tf32={tf32} bias={bias} grad(W,r,c)={gw:d}{gr:d}{gc:d}"

            def linear(gw=gw, gr=gr, gc=gc, bias=bias):
                x = _param((_T, _K), dtype, True)
                w, b = _param((_N, _K), dtype, gw), _param((_N, _K), dtype, False)
                r, c = _param(_N, dtype, gr), _param(_K, dtype, gc)
                y = ops.masked_delta_linear(x, w, b, r, c, _param(_N, dtype, True) if bias else None, "triton")
                y.backward(torch.ones_like(y))

            yield name, design, tf32, linear
        for gw, gr, gc in grads:
            name = f"masked_delta_swiglu design={design} tf32={tf32} grad(W,r,c)={gw:d}{gr:d}{gc:d}"

            def swiglu(gw=gw, gr=gr, gc=gc):
                x = _param((_T, _K), dtype, True)
                wg, bg = _param((_N, _K), dtype, gw), _param((_N, _K), dtype, False)
                wu, bu = _param((_N, _K), dtype, gw), _param((_N, _K), dtype, False)
                r, c = _param(_N, dtype, gr), _param(_K, dtype, gc)
                # gu_scratch=True, as the public function passes: eager backward writes over gu
                h = ops.masked_delta_swiglu(x, wg, bg, wu, bu, r, c, "triton", True)[0]
                h.backward(torch.ones_like(h))

            yield name, design, tf32, swiglu


def _carrier(dtype: torch.dtype):
    from ..ops import carrier_triton

    n_in, n_out = 512, 2048
    for n_tok, max_rows, routed in itertools.product((16, 32, 64, 128, 256, 4096), (256, 1024), (False, True)):
        def add(n_tok=n_tok, max_rows=max_rows, routed=routed):
            x = torch.zeros(n_tok, n_in, dtype=dtype, device=_DEVICE)
            y = torch.zeros(n_tok, n_out, dtype=dtype, device=_DEVICE)
            views = torch.zeros(2, 6, dtype=torch.int64, device=_DEVICE)  # empty carriers
            seg = torch.tensor([0, n_tok // 2, n_tok], dtype=torch.int32, device=_DEVICE)
            tok = torch.arange(n_tok, dtype=torch.int32, device=_DEVICE) if routed else None
            carrier_triton.carrier_add_(y, x, views, tok, seg, max_rows)

        yield f"carrier_add_ T={n_tok} max_rows={max_rows} routed={routed}", add


def _gather(dtype: torch.dtype):
    from ..ops import gather_triton

    for n_ch, index in itertools.product((16, 32, 64, 128, 256, 512, 1024, 4096), (torch.int32, torch.int64)):
        def gather(n_ch=n_ch, index=index):
            hidden = torch.zeros(16, 32, 4096, dtype=dtype, device=_DEVICE)
            positions = torch.zeros(16, dtype=torch.int64, device=_DEVICE)
            channels = torch.zeros(n_ch, dtype=index, device=_DEVICE)
            out = hidden.new_empty(16, n_ch)
            gather_triton.gather_channels_into(out, hidden, positions, channels)

        yield f"gather_channels_into C={n_ch} index={str(index).removeprefix('torch.')}", gather


def scenarios(dtype_name: str):
    """(description, callable) for one dtype; each callable launches kernels (recorded)."""
    dtype = getattr(torch, dtype_name)
    for name, design, tf32, fn in _masked_delta(dtype):
        def run(fn=fn, design=design, tf32=tf32):
            with _env(LCDD_TRITON_DESIGN=design), _tf32(tf32):
                fn()

        yield name, run
    yield from itertools.chain(_carrier(dtype), _gather(dtype))
