"""torch.compile of patched models: fullgraph (zero graph breaks), the same numbers as eager,
dynamic shapes without recompilation, and carrier ids as tensor inputs.

Most tests compile with ``aot_eager``: Dynamo's capture (where graph breaks happen) and AOT
autograd's joint forward/backward graph through the registered ops' fake implementations and
backward formulas are the same as with Inductor; only the kernel generation, which takes minutes
of C++ compilation on this CPU, is skipped. One training test and one serving test use Inductor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import lcdd_kernels as L
from lcdd_kernels.carriers.bank import CarrierBank
from lcdd_kernels.models.patch import apply_lcdd
from lcdd_kernels.models.tiny import TINY, tiny_model

from tests.helpers.sft_pairs import sft_pair


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the global counters
    yield
    torch._dynamo.reset()


def _patched(family, theta_seed=0):
    sft, base = tiny_model(family, seed=1), tiny_model(family, seed=0)
    handle = apply_lcdd(sft, base, seed=theta_seed, init_mean=0.3, init_std=1.0)  # a mix of open and closed entries
    sft.train()
    return sft, handle


def _batches(lengths, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 90, (batch, n), generator=g) for n in lengths]


def _train(model, handle, batches, forward):
    """Three optimizer steps (AdamW on weights, SGD on θ); per step the loss and every gradient."""
    groups = handle.parameters()
    opts = [torch.optim.AdamW(groups["weights"], lr=1e-2), torch.optim.SGD(groups["masks"], lr=0.5)]
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for ids in batches:
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {names[id(p)]: p.grad.clone() for g in groups.values() for p in g}
        out.append((loss.detach(), grads))
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    return out


def _assert_same_steps(compiled, eager):
    for step, ((lc, gc), (le, ge)) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} loss: {m}")
        assert gc.keys() == ge.keys()
        assert any(".lcdd_masks." in n for n in gc) and any("proj.weight" in n for n in gc)
        for name in ge:
            # fp32 rounding of a different summation order (Dynamo's decompositions), grown by
            # AdamW's normalised steps on near-zero gradients: 1e-4 of the tensor's largest entry
            scale = ge[name].abs().max().item() + 1e-12
            torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-4 * scale,
                                       msg=lambda m: f"step {step} grad {name}: {m}")


@pytest.mark.parametrize("family", sorted(TINY))
def test_lcdd_training_compiles_fullgraph_and_matches_eager(family):
    batches = _batches([7, 7, 7])
    model, handle = _patched(family)
    eager = _train(model, handle, batches, model)
    model, handle = _patched(family)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = _train(model, handle, batches, torch.compile(model, backend=counter, fullgraph=True))
    assert counter.frame_count == 1  # one graph for forward + backward, no break, no recompile
    _assert_same_steps(compiled, eager)


def test_lcdd_training_dynamic_shapes_no_recompilation():
    """Five sequence lengths (and two batch sizes): compiled once, dynamic from the start."""
    model, handle = _patched("qwen2")
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    lengths = [5, 9, 12, 6, 17]
    batches = [b[:2] if i % 2 else b for i, b in enumerate(_batches(lengths))]
    counts = []
    for ids in batches:
        forward(input_ids=ids, labels=ids).loss.backward()
        counts.append(counter.frame_count)
    # (the first call may hand the one frame to the backend twice while Dynamo settles the
    # dynamic dimensions; what matters is that the later shapes compile nothing)
    assert counts[0] >= 1 and counts[1:] == [counts[0]] * 4, f"backend calls after each shape: {counts}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_lcdd_training_inductor_matches_eager():
    """Inductor (generated C++ around the opaque lcdd ops) on one family."""
    batches = _batches([6, 6, 6], batch=2)
    model, handle = _patched("llama")
    eager = _train(model, handle, batches, model)
    model, handle = _patched("llama")
    compiled = _train(model, handle, batches, torch.compile(model, fullgraph=True))
    _assert_same_steps(compiled, eager)


def test_train_lcdd_compile_option_gives_the_eager_losses():
    from lcdd_kernels.dual import DualController

    from tests.helpers.train_examples import CTL, random_examples

    logs = []
    for comp in (False, True):
        sft, base = tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=0)
        res = L.train_lcdd(sft, base, random_examples(), controller=DualController(**CTL), max_steps=3, batch_size=4,
                           lr=1e-3, progress=False, compile=comp, compile_backend="aot_eager")
        logs.append([r["task_loss"] for r in res.log])
    assert logs[1] == pytest.approx(logs[0], rel=1e-5)


def test_trainer_torch_compile_with_callback_matches_eager(tmp_path):
    from transformers import Trainer, TrainingArguments

    from lcdd_kernels.dual import DualController
    from lcdd_kernels.train import LCDDCallback
    from lcdd_kernels.train.data import collate

    from tests.helpers.train_examples import CTL, random_examples

    examples = random_examples(n=4, seed=5)
    losses = []
    for comp in (False, True):
        sft, base = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
        handle = L.apply_lcdd(sft, base, seed=0)
        cb = LCDDCallback(handle, DualController(**CTL), mask_lr=0.5)
        args = TrainingArguments(output_dir=str(tmp_path / f"hf{comp}"), per_device_train_batch_size=4, max_steps=3,
                                 learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
                                 max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 remove_unused_columns=False, disable_tqdm=True, torch_compile=comp,
                                 torch_compile_backend="aot_eager" if comp else None)
        opt = torch.optim.AdamW(handle.parameters()["weights"], lr=1e-3, weight_decay=0.0)
        trainer = Trainer(model=sft, args=args, train_dataset=examples, data_collator=collate, callbacks=[cb],
                          optimizers=(opt, None))
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        if comp:
            assert trainer.model_wrapped is not sft or hasattr(trainer.model, "_orig_mod") or \
                torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert len(losses[0]) == 3 and all(math.isfinite(v) for v in losses[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


def _carrier(sft_seed):
    # An SFT that moved the norms too (embeddings frozen, as the authors train): the carriers have
    # dense parts, so the compiled bank also routes per-sequence norm weights (BankNorm).
    sft, base = sft_pair("qwen3", dtype=torch.float32, seed=sft_seed)
    handle = apply_lcdd(sft, base, seed=sft_seed, init_mean=0.0, init_std=1.0)
    carrier = L.extract_carrier(handle, include_theta=False)
    assert carrier.dense  # the norms the SFT moved
    return carrier


@pytest.fixture(scope="module")
def carriers():
    return [_carrier(s) for s in (1, 2, 3)]


def _base_model():
    model = tiny_model("qwen3", seed=0).eval()
    model.requires_grad_(False)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_apply_carrier_compiles_fullgraph_and_matches_eager(carriers):
    model = _base_model()
    L.apply_carrier(model, carriers[0])
    ids = _batches([6])[0]
    ref = _logits(model, ids)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    torch.testing.assert_close(_logits(compiled, ids), ref, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_bank_ids_are_inputs_and_adding_a_carrier_recompiles_once(carriers):
    model = _base_model()
    bank = L.apply_carrier_bank(model, carriers[:2])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = _batches([5])[0]

    def check(choice):
        with bank.carriers(choice):
            ref = _logits(model, ids)
            out = _logits(compiled, ids)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"ids {choice}: {m}")
        return ref

    first = check([0, 1, -1])
    check([1, -1, 0])
    check([-1, -1, -1])
    check([1, 1, 1])
    assert counter.frame_count == 1, "changing the carrier ids recompiled"
    # the ids matter: the same batch with other carriers gives other logits
    assert not torch.allclose(first, check([1, 0, 1]))

    bank.add(carriers[2], name="third")
    check([2, 0, -1])
    check([1, 2, 2])
    assert counter.frame_count == 2, "adding a carrier recompiles once (the table sizes are in the graph)"
    bank.remove("third")
    check([0, 1, 1])
    assert counter.frame_count <= 3
    check(0)  # one id for every sequence: a 0-d id tensor, another graph (once)
    check(1)
    assert counter.frame_count <= 4


def test_bank_decode_step_inductor_matches_eager(carriers):
    """Decode-sized steps (one token per sequence) through Inductor, two mixes of carrier ids."""
    model = _base_model()
    bank = L.apply_carrier_bank(model, carriers[:2])
    compiled = torch.compile(model, fullgraph=True)
    for ids, choice in ((_batches([1])[0], [1, 0, -1]), (_batches([1], seed=1)[0], [-1, 1, 0])):
        with bank.carriers(choice):
            torch.testing.assert_close(_logits(compiled, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def test_a_planted_graph_break_in_the_bank_path_is_caught(carriers, monkeypatch):
    """The fullgraph tests fail on a host sync in the routing (here an .item(), as a careless
    'skip when no carrier' would add)."""
    model = _base_model()
    bank = L.apply_carrier_bank(model, carriers[:2])
    original = CarrierBank.token_ids

    def with_sync(self, x):
        ids = original(self, x)
        if ids is not None and ids.max().item() < 0:
            return None
        return ids

    monkeypatch.setattr(CarrierBank, "token_ids", with_sync)
    ids = _batches([4])[0]
    with bank.carriers([0, 1, -1]):
        _logits(model, ids)  # eagerly fine
        # a graph break (Unsupported) or a data-dependent guard (UserError), depending on the sync
        with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
            _logits(torch.compile(model, backend="aot_eager", fullgraph=True), ids)


def test_lcdd_backend_override_recompiles_under_compile():
    """use_backend is guarded: a compiled function follows it (one recompile), with the same numbers."""
    from lcdd_kernels import masked_delta_linear, use_backend

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g))
    r, c = torch.rand(5, generator=g), torch.rand(6, generator=g)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda *a: masked_delta_linear(*a), backend=counter, fullgraph=True)
    out = fn(x, w, b, r, c)
    with use_backend("reference"):
        ref = fn(x, w, b, r, c)
    out2 = fn(x, w, b, r, c)
    assert counter.frame_count == 2
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out2, out)
