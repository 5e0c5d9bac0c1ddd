"""How the masked-delta ops cut their operands, one definition for every backend: activations
flattened to (T, width) rows, weights into row blocks whose W_eff slice stays ~1/16 of a weight.

Imported by :mod:`.masked_delta` (torch backend and the registered ops), :mod:`.masked_delta_triton`
(``split`` design) and :mod:`.carrier`; it imports none of them.
"""

from __future__ import annotations

import math

import torch

#: Up to this many weight elements a single block is used. Above it the weight is processed in
#: BLOCKS row (or column) blocks so that the transient W_eff block is ~1/16 of a weight: measured
#: on CPU (lcdd bench training), a 1024×1024 projection at the old 2^20 threshold kept a whole
#: extra W_eff alive (+2.0 weight copies over dense instead of +1.07).
SINGLE_BLOCK_NUMEL = 1 << 16
BLOCKS = 16


def row_blocks(n: int, k: int):
    """Blocks of ``n`` (rows of an n×k weight) whose W_eff slices stay ~1/BLOCKS of the weight."""
    if n * k <= SINGLE_BLOCK_NUMEL:
        return [(0, n)]
    step = max(1, math.ceil(n / BLOCKS))
    step = (step + 7) // 8 * 8  # keep block starts aligned for the GEMM library
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def flat(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) -> (T, width). ``reshape(-1, width)`` cannot infer T when width is 0
    (K = 0 input features or N = 0 outputs), so T is given."""
    return t.reshape(math.prod(t.shape[:-1]), width)
