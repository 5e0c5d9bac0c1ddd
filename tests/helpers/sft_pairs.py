"""(SFT, base) tiny models that differ the way a real SFT run differs: every projection weight, every
norm weight and every projection bias moved; embeddings and lm_head frozen (the authors' recipe).
The base has random biases (HF initialises them to zero, which would hide a bias mix-up)."""

from __future__ import annotations

import torch

from lcdd_kernels.models.tiny import tiny_model


def sft_pair(family: str, dtype=torch.float64, scale: float = 0.05, frozen_embeddings: bool = True, seed: int = 12):
    """``seed`` draws the SFT changes; the base is the same for every seed."""
    base = tiny_model(family, seed=0, dtype=dtype)
    sft = tiny_model(family, seed=0, dtype=dtype)
    gb, g = torch.Generator().manual_seed(11), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (name, pb), (_, ps) in zip(base.named_parameters(), sft.named_parameters()):
            if name.endswith(".bias"):
                pb.copy_(torch.randn(pb.shape, generator=gb, dtype=torch.float64).to(dtype) * 0.1)
                ps.copy_(pb)
            if frozen_embeddings and ("embed_tokens" in name or name.startswith("lm_head")):
                continue
            noise = torch.randn(ps.shape, generator=g, dtype=torch.float64).to(dtype)
            ps.add_(noise * (scale if ps.dim() == 1 else ps.detach().abs().mean() * 0.5))
    return sft, base
