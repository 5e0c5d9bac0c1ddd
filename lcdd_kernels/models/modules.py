"""The nn.Modules that ``apply_lcdd`` puts into a model.

Each decoder layer owns one :class:`~lcdd_kernels.masks.HeavisideMask` (attribute ``lcdd_masks``)
with the eight groups of SPEC §2, so per-layer sharding (FSDP2 ``fully_shard`` per decoder layer)
owns its masks. Projections keep a plain reference to that mask module (not a submodule, so it is
registered once) and read their row and column masks inside their own forward.

The frozen base weight ``B`` is an ``nn.Parameter`` with ``requires_grad=False`` rather than a
buffer: FSDP2 shards parameters but replicates buffers, and ``B`` is as large as ``W``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..masks import HeavisideMask
from ..ops.masked_delta import effective_weight, masked_delta_linear, masked_delta_swiglu
from .families import Dims, Projection, expand_gqa

#: Attribute name of the per-layer mask module on each decoder layer.
MASKS_ATTR = "lcdd_masks"


class MaskedDeltaLinear(nn.Module):
    """``y = x·(B + (r cᵀ) ⊙ (W − B))ᵀ + b`` (SPEC §1) with r, c read from the layer's masks.

    Parameters: ``weight`` W (N, K), trainable; ``base`` B (N, K), frozen; ``bias`` (N,) or None.
    """

    def __init__(self, linear: nn.Linear, base: torch.Tensor, masks: HeavisideMask, proj: Projection, dims: Dims):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.base = nn.Parameter(base, requires_grad=False)
        self.bias = linear.bias
        self.proj = proj
        self.dims = dims
        # A plain reference: the decoder layer owns (registers, shards, saves) the mask module.
        self.__dict__["masks"] = masks

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rows={self.proj.rows!r}, cols={self.proj.cols!r}"
                + (" (GQA-expanded)" if self.proj.gqa_cols else ""))

    def row_mask(self) -> torch.Tensor:
        return self.masks.group(self.proj.rows)

    def col_mask(self) -> torch.Tensor:
        c = self.masks.group(self.proj.cols)
        return expand_gqa(c, self.dims) if self.proj.gqa_cols else c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_delta_linear(x, self.weight, self.base, self.row_mask(), self.col_mask(), self.bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W_eff with the current binary masks, (N, K), in the weight's dtype."""
        r = (self.masks.group_theta(self.proj.rows) > 0).to(self.weight.dtype)
        c = (self.masks.group_theta(self.proj.cols) > 0).to(self.weight.dtype)
        if self.proj.gqa_cols:
            c = expand_gqa(c, self.dims)
        return effective_weight(self.weight, self.base, r, c)

    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain nn.Linear with W_eff (``merge=True``) or the raw trainable W."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.merged_weight(), requires_grad=True) if merge else self.weight
        if self.bias is not None:
            lin.bias = self.bias
        return lin


class MaskedDeltaSwiGLU(nn.Module):
    """The MLP ``down(silu(gate(x)) ⊙ up(x))`` with gate and up fused through
    :func:`~lcdd_kernels.masked_delta_swiglu` (they share ``ffn_hidden`` rows and ``ffn_read``
    columns) and down_proj a :class:`MaskedDeltaLinear`.

    The fused op reads gate/up weights in this module's forward, so a sharding unit must contain the
    whole MLP (per decoder layer, as recommended, does). ``shell`` is the original MLP module with its
    projections taken out; :meth:`restore` puts plain linears back into it.
    """

    def __init__(self, gate: MaskedDeltaLinear, up: MaskedDeltaLinear, down: MaskedDeltaLinear, shell: nn.Module):
        super().__init__()
        if (gate.proj.rows, gate.proj.cols) != (up.proj.rows, up.proj.cols):
            raise ValueError("MaskedDeltaSwiGLU: gate and up projections must share their masks")
        if gate.bias is not None or up.bias is not None:
            raise ValueError("MaskedDeltaSwiGLU: gate/up biases (mlp_bias=True) are not supported by the "
                             "fused SwiGLU op; train this model without mlp_bias")
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.__dict__["shell"] = shell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        h = masked_delta_swiglu(x, g.weight, g.base, u.weight, u.base, g.row_mask(), g.col_mask())
        return self.down_proj(h)

    def restore(self, merge: bool = True) -> nn.Module:
        shell = self.shell
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(shell, name, getattr(self, name).to_linear(merge))
        return shell
