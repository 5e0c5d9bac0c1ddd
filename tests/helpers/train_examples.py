"""Token examples and controller settings shared by the training tests."""

from __future__ import annotations

import torch

from lcdd_kernels.train.data import IGNORE

CTL = dict(warmup_steps=2, lambda_init=0.5, budget_ratio=0.05, lambda_lr=0.5)


def random_examples(n=8, t=10, prompt=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 90, (t,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out
