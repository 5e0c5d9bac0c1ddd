"""HeavisideMask (SPEC §2) and DualController (SPEC §3) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import lcdd_kernels as L


def test_heaviside_forward_is_binary_and_backward_is_sigmoid_prime():
    m = L.HeavisideMask(5)
    with torch.no_grad():
        m.theta.copy_(torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0]))
    v = m()
    assert v.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (v * w).sum().backward()
    s = torch.sigmoid(m.theta.detach())
    assert torch.allclose(m.theta.grad, w * s * (1 - s), rtol=0, atol=1e-7)
    # hand value for θ = 0: σ'(0) = 1/4
    assert m.theta.grad[2].item() == pytest.approx(3 * 0.25)


def test_heaviside_eval_is_exactly_binary_without_graph():
    m = L.HeavisideMask(100).eval()
    v = m()
    assert not v.requires_grad
    assert set(v.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(v, (m.theta > 0).float())


def test_heaviside_l0_groups_and_init():
    gen = torch.Generator().manual_seed(0)
    m = L.HeavisideMask(groups={"a": 3, "b": 0, "c": 20_000}, generator=gen)
    assert len(m) == 20_003 and m.range("c") == (3, 20_003) and m.range("b") == (3, 3)
    assert m.theta.mean().item() == pytest.approx(1.5, abs=0.02)
    assert m.theta.std().item() == pytest.approx(0.5, abs=0.02)
    assert m.l0().item() == pytest.approx(torch.sigmoid(m.theta.detach()).sum().item(), rel=1e-6)
    parts = m.split()
    assert [p.numel() for p in parts.values()] == [3, 0, 20_000]
    assert torch.equal(m.group("a"), m()[:3])
    with pytest.raises(KeyError, match="no group 'z'"):
        m.range("z")
    with pytest.raises(ValueError, match="add up to"):
        L.HeavisideMask(4, groups={"a": 3})


def test_dual_controller_hand_sequence():
    ctl = L.DualController(budget_ratio=0.5, lambda_init=0.1, lambda_lr=0.2, lambda_grow_lr=0.4,
                           warmup_steps=2, ema_beta=0.5)
    assert ctl.warmup_factor(0) == 0 and ctl.warmup_factor(1) == 0.5 and ctl.warmup_factor(5) == 1
    # EMA with bias correction: raw 0.5*2 = 1.0, corrected 1.0 / (1 - 0.5) = 2.0
    assert ctl.observe(2.0) == pytest.approx(2.0)
    assert ctl.step(0) == 0.1 and ctl.epsilon is None  # before warmup: nothing moves
    # raw EMA: 0.5*0 + 0.5*2 = 1.0, then 0.5*1.0 + 0.5*4 = 2.5; corrected 2.5 / (1 - 0.25)
    ema = 2.5 / 0.75
    assert ctl.observe(4.0) == pytest.approx(ema) == pytest.approx(10 / 3)
    # step 2 = warmup: baseline fixed, eps = 10/3 * 1.5 = 5; v = (10/3 - 5)/5 = -1/3 -> grow with 0.4
    lam = ctl.step(2)
    assert ctl.baseline == pytest.approx(ema) and ctl.epsilon == pytest.approx(5.0)
    assert lam == pytest.approx(0.1 * math.exp(0.4 / 3))
    # over budget: loss 20 -> raw 0.5*2.5 + 10 = 11.25, corrected /0.875 = 12.857; v = 1.5714
    ctl.observe(20.0)
    v = (11.25 / 0.875 - 5) / 5
    lam2 = ctl.step(3)
    assert ctl.last_violation == pytest.approx(v)
    assert lam2 == pytest.approx(lam * math.exp(-0.2 * v))
    assert ctl.penalty(torch.tensor(10.0), 1).item() == pytest.approx(lam2 * 0.5 * 10)


def test_dual_controller_clamps_clips_and_resumes():
    ctl = L.DualController(lambda_init=5.0, lambda_lr=10.0, warmup_steps=0, lambda_max=6.0,
                           violation_clip=0.1, ema_beta=0.0)
    ctl.observe(1.0)
    ctl.step(0)  # eps = 1.3, v = -0.23 clipped to -0.1 -> 5 * e^1 = 13.6 clamped to 6
    assert ctl.last_violation == pytest.approx(-0.1) and ctl.lam == 6.0
    state = ctl.state_dict()
    other = L.DualController()
    other.load_state_dict(state)
    assert other.lam == 6.0 and other.epsilon == pytest.approx(1.3) and other.ema == pytest.approx(1.0)
    assert other.violation_clip == 0.1 and other.warmup_steps == 0
    for _ in range(200):
        ctl.observe(100.0)
        ctl.step(1)
    assert ctl.lam == pytest.approx(1e-6)  # floor


def test_dual_controller_rejects_bad_values():
    with pytest.raises(ValueError, match="ema_beta"):
        L.DualController(ema_beta=1.0)
    ctl = L.DualController()
    with pytest.raises(ValueError, match="not finite"):
        ctl.observe(float("nan"))
