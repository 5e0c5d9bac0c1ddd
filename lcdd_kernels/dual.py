"""The dual controller of LCDD (SPEC §3): λ follows the task loss against its budget ε.

Any training loop uses it the same way::

    ctl = DualController()
    for step, batch in ...:
        task = model(**batch).loss
        ctl.observe(task)                      # every micro-batch
        loss = task + ctl.penalty(handle.l0(), step)
        loss.backward(); opt.step()
        ctl.step(step)                         # every optimizer step
"""

from __future__ import annotations

import math

import torch


class DualController:
    def __init__(
        self,
        budget_ratio: float = 0.3,
        lambda_init: float = 0.01,
        lambda_lr: float = 0.1,
        lambda_grow_lr: float | None = None,
        lambda_min: float = 1e-6,
        lambda_max: float = 10.0,
        warmup_steps: int = 300,
        ema_beta: float = 0.95,
        violation_clip: float = math.inf,
    ):
        if not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"DualController: ema_beta must be in [0, 1), got {ema_beta}")
        if budget_ratio < 0:
            raise ValueError(f"DualController: budget_ratio must be >= 0, got {budget_ratio}")
        if not 0 < lambda_min <= lambda_max:
            raise ValueError(
                f"DualController: need 0 < lambda_min <= lambda_max, got {lambda_min}, {lambda_max}"
            )
        if warmup_steps < 0:
            raise ValueError(f"DualController: warmup_steps must be >= 0, got {warmup_steps}")
        if violation_clip <= 0:
            raise ValueError(f"DualController: violation_clip must be > 0, got {violation_clip}")
        self.budget_ratio = float(budget_ratio)
        self.lambda_lr = float(lambda_lr)
        self.lambda_grow_lr = float(lambda_grow_lr if lambda_grow_lr is not None else lambda_lr)
        self.lambda_min = float(lambda_min)
        self.lambda_max = float(lambda_max)
        self.warmup_steps = int(warmup_steps)
        self.ema_beta = float(ema_beta)
        self.violation_clip = float(violation_clip)
        self.lam = min(max(float(lambda_init), self.lambda_min), self.lambda_max)
        self._ema_raw = 0.0
        self._n = 0
        self.baseline: float | None = None
        self.epsilon: float | None = None
        self.last_violation: float | None = None

    # -- per micro-batch ------------------------------------------------------------------------
    def observe(self, task_loss) -> float:
        """Fold one micro-batch's task loss into the EMA; returns the bias-corrected EMA."""
        value = float(task_loss.detach()) if isinstance(task_loss, torch.Tensor) else float(task_loss)
        if not math.isfinite(value):
            raise ValueError(f"DualController.observe: task loss is not finite ({value})")
        b = self.ema_beta
        self._ema_raw = b * self._ema_raw + (1 - b) * value
        self._n += 1
        return self.ema

    @property
    def ema(self) -> float | None:
        """Bias-corrected EMA of the task loss, ``ema / (1 − β^n)``; None before any observation."""
        if self._n == 0:
            return None
        return self._ema_raw / (1 - self.ema_beta**self._n)

    # -- per optimizer step ---------------------------------------------------------------------
    def warmup_factor(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, step / self.warmup_steps)

    def penalty(self, l0, step: int):
        """``λ · min(1, step / warmup) · L0`` for the current λ."""
        return (self.lam * self.warmup_factor(step)) * l0

    def step(self, global_step: int) -> float:
        """One dual update after the optimizer step ``global_step``; returns λ.

        Before warmup ends λ stays put. At the first step at or after warmup the budget is fixed
        from the EMA (``ε = baseline · (1 + budget_ratio)``) and the update runs from that step on.
        """
        if global_step < self.warmup_steps or self._n == 0:
            return self.lam
        ema = self.ema
        if self.epsilon is None:
            self.baseline = ema
            self.epsilon = ema * (1 + self.budget_ratio)
        if self.epsilon <= 0:
            # A zero-loss baseline leaves no relative budget to measure against: hold λ.
            self.last_violation = 0.0
            return self.lam
        v = (ema - self.epsilon) / self.epsilon
        v = max(-self.violation_clip, min(self.violation_clip, v))
        eta = self.lambda_grow_lr if v < 0 else self.lambda_lr
        self.lam = min(max(self.lam * math.exp(-eta * v), self.lambda_min), self.lambda_max)
        self.last_violation = v
        return self.lam

    # -- checkpointing --------------------------------------------------------------------------
    _FIELDS = ("lam", "_ema_raw", "_n", "baseline", "epsilon", "last_violation")
    _CONFIG = ("budget_ratio", "lambda_lr", "lambda_grow_lr", "lambda_min", "lambda_max",
               "warmup_steps", "ema_beta", "violation_clip")

    def state_dict(self) -> dict:
        state = {k: getattr(self, k) for k in self._FIELDS}
        state["config"] = {k: getattr(self, k) for k in self._CONFIG}
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in self._FIELDS if k not in state]
        if missing:
            raise KeyError(f"DualController.load_state_dict: missing keys {missing}")
        for k in self._FIELDS:
            setattr(self, k, state[k])
        for k, v in state.get("config", {}).items():
            if k in self._CONFIG:
                setattr(self, k, v)

    def __repr__(self) -> str:
        return (f"DualController(lam={self.lam:.4g}, ema={self.ema}, epsilon={self.epsilon}, "
                f"budget_ratio={self.budget_ratio}, warmup_steps={self.warmup_steps})")
