"""The lcdd-step benchmark compares equal work: its parametrize provider (the authors' approach)
computes the same loss and gradients as apply_lcdd for the same masks, its compiled providers the
same step as the eager ones; its projection FLOP share is what torch's FLOP counter counts."""

from __future__ import annotations

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.bench.lcdd_step import _base_state, _parametrize, build_model, prepare, proj_flop_share
from lcdd_kernels.models.families import GROUPS
from lcdd_kernels.models.tiny import tiny_model

from tests.helpers.compare import assert_close


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


def test_proj_flop_share_matches_the_flop_counter():
    """proj_flop_share against torch's FlopCounterMode on the bench's model: the projections and
    the lm_head are the counted mm FLOPs, attention the bmm FLOPs (counted without the causal
    mask, so half of them are the formula's)."""
    from torch.utils.flop_counter import FlopCounterMode

    seq = 24
    model = build_model(2, "cpu", torch.float32, vocab=512)
    model.set_attn_implementation("eager")  # attention as bmm, which the counter sees
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=torch.randint(0, 512, (1, seq)))
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    head = sum(fc.get_flop_counts()["Qwen3ForCausalLM.lm_head"].values())
    proj, attn = counts["aten.mm"] - head, counts["aten.bmm"] / 2
    assert proj_flop_share(model.config, seq) == pytest.approx(proj / (proj + attn + head), rel=1e-12)


@pytest.mark.parametrize("provider", ["plain-sft", "lcdd"])
def test_compiled_providers_run_the_same_step(provider):
    """A *-compiled provider is its eager provider's step through torch.compile: same loss after
    the same warm-up step (aot_eager here; the bench's default is Inductor)."""
    case = {"layers": 1, "batch": 1, "seq": 8, "vocab": 256}
    eager = prepare(case, provider, "cpu", "float32")
    compiled = prepare(case, f"{provider}-compiled", "cpu", "float32", compile_backend="aot_eager")
    assert compiled.info["compile_s"] > 0 and eager.info["compile_s"] is None
    torch.testing.assert_close(compiled.forward(), eager.forward(), rtol=1e-5, atol=1e-5)
