"""LCDD inside ``transformers.Trainer`` (or TRL's trainers) through one callback.

The Trainer keeps computing the plain SFT loss and stepping its optimizer on the weights; the
callback does the rest of SPEC §3: it records each micro-batch's task loss (a forward hook on the
model), adds the sparsity penalty's gradient to θ and steps the masks' own SGD just before the
Trainer's optimizer step, and runs the dual update after it. Usage::

    handle = apply_lcdd(model, base)
    cb = LCDDCallback(handle)                     # DualController() and SGD(lr=0.1) on the masks
    opt = torch.optim.AdamW(handle.parameters()["weights"], lr=2e-5)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb], optimizers=(opt, None)).train()

The Trainer's optimizer must not hold the masks (they get SGD, not AdamW). Note that the Trainer
clips gradients before the callback adds the penalty: clipping sees the task gradient only.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..dual import DualController


class LCDDCallback(TrainerCallback):
    def __init__(self, handle, controller: DualController | None = None, mask_lr: float = 0.1):
        self.handle = handle
        self.controller = controller or DualController()
        self.mask_optimizer = torch.optim.SGD(handle.parameters()["masks"], lr=mask_lr, momentum=0.0)
        self._hook = None

    def _record(self, module, args, kwargs, output):
        loss = getattr(output, "loss", None)
        if loss is None or not module.training or not torch.is_grad_enabled():
            return
        value = loss.detach().float()
        n_items, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
        if n_items is not None and labels is not None:
            # The Trainer then normalises by the tokens of the whole accumulated step; the EMA of
            # SPEC §3 wants this micro-batch's own mean.
            local = (labels[..., 1:] != -100).sum().clamp_min(1)
            value = value * torch.as_tensor(n_items, dtype=value.dtype, device=value.device) / local
        self.controller.observe(value)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None:
            masks = {id(p) for p in self.handle.parameters()["masks"]}
            if any(id(p) in masks for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("LCDDCallback: the Trainer's optimizer holds the mask logits θ; pass "
                                 "optimizers=(torch.optim.AdamW(handle.parameters()['weights'], lr=...), None) "
                                 "so that the masks get only the callback's SGD")
        if self._hook is None:
            self._hook = self.handle.model.register_forward_hook(self._record, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        ctl = self.controller
        self.handle.add_penalty_grad_(ctl.lam * ctl.warmup_factor(state.global_step))
        self.mask_optimizer.step()

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            ctl = self.controller
            logs.update({"lcdd_lambda": ctl.lam, "lcdd_ema": ctl.ema, "lcdd_epsilon": ctl.epsilon,
                         "lcdd_sparsity": self.handle.stats()["overall"]["sparsity"]})

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
