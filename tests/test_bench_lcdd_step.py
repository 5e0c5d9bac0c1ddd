"""The lcdd-step benchmark compares equal work: its parametrize provider (the authors' approach)
computes the same loss and gradients as apply_lcdd for the same masks."""

from __future__ import annotations

import torch

import lcdd_kernels as L
from lcdd_kernels.bench.lcdd_step import _base_state, _parametrize
from lcdd_kernels.models.families import GROUPS
from lcdd_kernels.models.tiny import tiny_model

from .helpers import assert_close


def test_parametrize_provider_equals_lcdd():
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    a = tiny_model("qwen3", seed=1, dtype=torch.float64)
    masks = _parametrize(a, _base_state(tiny_model("qwen3", seed=1, dtype=torch.float64)))
    with torch.no_grad():
        for t in masks:
            t.normal_(0.0, 1.0)
    theta = torch.cat([layer.bench_masks[g].detach() for layer in a.model.layers for g in GROUPS])

    b = tiny_model("qwen3", seed=1, dtype=torch.float64)
    handle = L.apply_lcdd(b, _base_state(tiny_model("qwen3", seed=1, dtype=torch.float64)), theta=theta)
    out_a, out_b = a(input_ids=ids, labels=ids), b(input_ids=ids, labels=ids)
    # the parametrization builds W_eff in float32 (as the authors do): compare at float32 precision
    assert_close("loss", out_b.loss, out_a.loss.detach(), dtype=torch.float32)
    out_a.loss.backward()
    out_b.loss.backward()
    grad_a = torch.cat([layer.bench_masks[g].grad for layer in a.model.layers for g in GROUPS])
    assert_close("dθ", torch.cat([m.theta.grad for m in handle.masks]).double(), grad_a, dtype=torch.float32)
    w = a.model.layers[1].self_attn.o_proj.parametrizations.weight.original
    assert_close("dW o_proj", b.model.layers[1].self_attn.o_proj.weight.grad, w.grad, dtype=torch.float32)
