"""LCDD under FSDP2: two gloo ranks on the CPU, ``fully_shard`` per decoder layer, against one process.

Each rank takes half of every micro-batch; examples have equal numbers of label tokens, so the mean
of the two ranks' losses is the single process's loss and FSDP2's gradient averaging is exact.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcdd_kernels.dual import DualController

CTL = dict(warmup_steps=1, lambda_init=0.2, budget_ratio=0.05, lambda_lr=0.5)
STEPS = 4
KW = dict(lr=5e-3, mask_lr=0.5, batch_size=4, grad_accum=2, max_steps=STEPS, shuffle=False, max_grad_norm=1.0,
          progress=False, plot=False)

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def _setup():
    from lcdd_kernels import apply_lcdd
    from lcdd_kernels.models.families import Dims
    from lcdd_kernels.models.tiny import tiny_model

    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(8):
        ids = torch.randint(3, 90, (10,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    sft, base = tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=0)
    theta0 = 0.05 * torch.randn(Dims.from_config(sft).num_masks, generator=g)
    return sft, apply_lcdd(sft, base, theta=theta0), examples


def _run(handle, examples):
    from lcdd_kernels.train import train_lcdd

    res = train_lcdd(handle.model, None, examples, handle=handle, controller=DualController(**CTL), **KW)
    return {"losses": [r["task_loss"] for r in res.log], "lambda": [r["lambda"] for r in res.log],
            "theta": handle.flat_theta(), "active": [r["active"] for r in res.log]}


def _worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        from lcdd_kernels import decoder_layers

        sft, handle, examples = _setup()
        for layer in decoder_layers(sft):
            fully_shard(layer)
        fully_shard(sft)
        assert type(handle.masks[0].theta).__name__ == "DTensor"  # sharded with its layer
        result = _run(handle, examples)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_match_single_process(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(*_setup()[1:])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "rank0.pt"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks inherit it
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert sharded["lambda"] == pytest.approx(single["lambda"], rel=1e-6)
    assert sharded["active"] == single["active"]
    assert single["active"][-1] < single["active"][0], "masks should switch off, or the test checks little"
    torch.testing.assert_close(sharded["theta"], single["theta"], rtol=0, atol=1e-5)
