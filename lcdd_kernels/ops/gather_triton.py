"""Triton kernel of the channel gather (see gather.py). Imported lazily: TRITON_INTERPRET must be
set before the kernel below is defined."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_channels_kernel(h_ptr, pos_ptr, ch_ptr, out_ptr, n_ch, sb, ss, sd, ob, oc,
                            BLOCK_C: tl.constexpr):
    # One program per (row, block of channels): one position load, then a gather of BLOCK_C
    # channels along that row. 64-bit offsets: B·S·D easily exceeds 2^31 elements.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < n_ch
    pos = tl.load(pos_ptr + b).to(tl.int64)
    ch = tl.load(ch_ptr + offs, mask=m, other=0).to(tl.int64)
    v = tl.load(h_ptr + b * sb + pos * ss + ch * sd, mask=m)
    tl.store(out_ptr + b * ob + offs.to(tl.int64) * oc, v, mask=m)


def gather_channels_into(out: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                         channels: torch.Tensor) -> None:
    n_b, n_ch = out.shape
    block = min(1024, triton.next_power_of_2(max(n_ch, 16)))
    grid = (n_b, triton.cdiv(n_ch, block))
    _gather_channels_kernel[grid](
        hidden, positions, channels, out, n_ch,
        hidden.stride(0), hidden.stride(1), hidden.stride(2), out.stride(0), out.stride(1),
        BLOCK_C=block,
    )
