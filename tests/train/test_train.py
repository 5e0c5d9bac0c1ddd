"""Training: train_lcdd step by step against the literal SPEC reference loop (every family),
checkpoint/resume, data rendering, train_sft, outputs, and the transformers.Trainer callback."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.dual import DualController
from lcdd_kernels.models.families import Dims
from lcdd_kernels.models.tiny import TINY, tiny_model, tiny_tokenizer
from lcdd_kernels.train import LCDDCallback, TrainConfig, as_examples, encode, train_lcdd, train_sft
from lcdd_kernels.train.data import IGNORE

from tests.helpers.lcdd_reference import SpecLCDD
from tests.helpers.train_examples import CTL, random_examples


def _reference_run(plain, sft_state, base_state, theta0, examples, cfg: TrainConfig, steps):
    """SPEC §3 literally: loss = task + λ·min(1, step/warmup)·Σσ(θ) through autograd."""
    from lcdd_kernels.train.data import collate

    ref = SpecLCDD(plain, sft_state, base_state, theta0)
    weights = list(ref.W.values())
    opt_w = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=0.0)
    opt_m = torch.optim.SGD([ref.theta], lr=cfg.mask_lr, momentum=0.0)
    ctl = DualController(**CTL)
    losses, micro = [], 0
    for step in range(steps):
        task_sum = 0.0
        for _ in range(cfg.grad_accum):
            batch = collate(examples[micro * cfg.batch_size:(micro + 1) * cfg.batch_size])
            micro = (micro + 1) % (len(examples) // cfg.batch_size)
            task = ref(**batch).loss
            ctl.observe(task)
            task_sum += task.item()
            (task / cfg.grad_accum).backward()
        (ctl.lam * min(1.0, step / CTL["warmup_steps"]) * ref.l0()).backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm)
        opt_w.step()
        opt_m.step()
        opt_w.zero_grad()
        opt_m.zero_grad()
        ctl.step(step + 1)
        losses.append(task_sum / cfg.grad_accum)
    return losses, ref, ctl


@pytest.mark.parametrize("family", list(TINY))
def test_lcdd_loop_matches_spec_reference_step_by_step(family):
    sft, base = tiny_model(family, seed=1, dtype=torch.float64), tiny_model(family, seed=0, dtype=torch.float64)
    plain = tiny_model(family, seed=0, dtype=torch.float64)
    sft_state = {k: v.clone() for k, v in sft.state_dict().items()}
    n = Dims.from_config(sft).num_masks
    theta0 = 0.02 * torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.01
    examples = random_examples()
    cfg = TrainConfig(lr=5e-3, mask_lr=0.5, batch_size=2, grad_accum=2, max_steps=6, shuffle=False,
                      max_grad_norm=0.5, progress=False, plot=False)
    handle = L.apply_lcdd(sft, base, theta=theta0, non_projection="base")
    result = train_lcdd(sft, None, examples, config=cfg, controller=DualController(**CTL), handle=handle)
    ref_losses, ref, ref_ctl = _reference_run(plain, sft_state, base.state_dict(), theta0, examples, cfg, 6)

    losses = [r["task_loss"] for r in result.log]
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-12)
    assert result.controller.lam == pytest.approx(ref_ctl.lam, rel=1e-10)
    # θ is stored in float32 whatever the model dtype (masks stay fp32 under bf16 training too)
    assert handle.masks[0].theta.dtype == torch.float32
    assert torch.allclose(handle.flat_theta().double(), ref.theta.detach(), rtol=0, atol=1e-6)
    flips = int(((theta0 > 0) != (handle.flat_theta().double() > 0)).sum())
    assert flips > 0, "the run should switch some masks, or it tests little"
    for name, mod in handle.modules.items():
        assert torch.allclose(mod.weight.detach(), ref.W[name].detach(), rtol=0, atol=1e-10), name


def test_checkpoint_resume_is_exact(tmp_path):
    examples = random_examples(n=12, seed=3)
    kw = dict(lr=5e-3, batch_size=2, grad_accum=2, progress=False, plot=False, seed=4)

    def fresh():
        return tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=0)

    sft, base = fresh()
    full = train_lcdd(sft, base, examples, out_dir=tmp_path / "a", controller=DualController(**CTL), max_steps=8, **kw)
    sft, base = fresh()
    train_lcdd(sft, base, examples, out_dir=tmp_path / "b", controller=DualController(**CTL), max_steps=5, **kw)
    with pytest.raises(FileExistsError, match="not empty.*resume=True"):
        train_lcdd(*fresh(), examples, out_dir=tmp_path / "b", max_steps=8, **kw)
    sft, base = fresh()
    resumed = train_lcdd(sft, base, examples, out_dir=tmp_path / "b", controller=DualController(**CTL),
                         max_steps=8, resume=True, **kw)
    assert [r["step"] for r in resumed.log] == list(range(1, 9))
    for key in ("task_loss", "lambda", "sparsity", "ema"):
        assert [r[key] for r in resumed.log] == pytest.approx([r[key] for r in full.log], rel=1e-6), key
    assert torch.equal(full.handle.flat_theta(), resumed.handle.flat_theta())
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {"task_loss", "ema", "epsilon", "lambda", "sparsity"} <= set(log[-1])
    assert not (tmp_path / "b" / "curves.png").exists()  # plot=False
    carrier = L.load_carrier(tmp_path / "b" / "carrier")
    assert torch.equal(carrier.theta, resumed.handle.flat_theta())


def test_outputs_progress_and_plot(tmp_path, capsys):
    sft, base = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    res = train_lcdd(sft, base, random_examples(), out_dir=tmp_path / "run", max_steps=3, batch_size=4,
                     controller=DualController(**CTL))
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "checkpoint-3" / "state.pt").is_file()
    assert "lcdd" in capsys.readouterr().err  # the tqdm bar
    assert res.carrier is not None and L.load_carrier(tmp_path / "run" / "carrier").family == "llama"


def test_train_sft_trains_and_saves(tmp_path):
    tok = tiny_tokenizer()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "response": "I don't know."}) + "\n" for i in range(8)))
    model = tiny_model("qwen2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train_sft(model, data, tok, out_dir=tmp_path / "sft", lr=3e-3, epochs=3, batch_size=4, progress=False)
    assert len(res.log) == 6 and res.log[-1]["task_loss"] < res.log[0]["task_loss"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.endswith("_proj.weight")}  # projections only, by default
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(tmp_path / "sft" / "model")("ab")["input_ids"] == tok("ab")["input_ids"]


# ---------------------------------------------------------------------------------------- data


def test_data_labels_cover_response_only():
    tok = tiny_tokenizer()
    ex = encode({"prompt": "hi", "response": "yo"}, tok)
    full = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert ex["input_ids"] == list(full)
    trained = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(trained) == "yo</s>"
    chat = encode({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, tok)
    assert tok.decode([i for i, lab in zip(chat["input_ids"], chat["labels"]) if lab != IGNORE]) == "b</s>d</s>"
    plain = tiny_tokenizer(chat_template=False)
    ex = encode({"prompt": "hi", "response": "yo"}, plain)
    assert ex["input_ids"][0] == plain.bos_token_id
    assert plain.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == "yo</s>"
    assert encode({"prompt": "hi", "response": "yo"}, tok, train_on_prompt=True)["labels"] == \
        encode({"prompt": "hi", "response": "yo"}, tok)["input_ids"]


def test_data_errors(tmp_path):
    tok = tiny_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        as_examples(bad, tok)
    with pytest.raises(ValueError, match="example 0: an example needs 'prompt' and 'response'"):
        as_examples([{"text": "x"}], tok)
    with pytest.raises(ValueError, match="need a tokenizer"):
        as_examples([{"prompt": "a", "response": "b"}])
    with pytest.raises(TypeError, match="unknown training options"):
        train_sft(tiny_model("llama"), random_examples(), nonsense=1)


# ------------------------------------------------------------------------------ Trainer callback


def test_trainer_callback_matches_own_loop(tmp_path, capsys):
    """transformers.Trainer + LCDDCallback gives the same losses, λ and masks as train_lcdd (one
    full-dataset batch per step, so the Trainer's shuffling cannot change a step)."""
    from transformers import Trainer, TrainingArguments

    from lcdd_kernels.train.data import collate

    examples = random_examples(n=4, seed=5)
    n_steps = 4
    theta0 = 0.05 * torch.randn(Dims.from_config(tiny_model("llama")).num_masks,
                                generator=torch.Generator().manual_seed(0))

    sft, base = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    handle = L.apply_lcdd(sft, base, theta=theta0, non_projection="base")
    own = train_lcdd(sft, None, examples, handle=handle, controller=DualController(**CTL), lr=1e-3, mask_lr=0.5,
                     batch_size=4, max_steps=n_steps, shuffle=False, max_grad_norm=None, progress=False)

    sft, base = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    handle = L.apply_lcdd(sft, base, theta=theta0, non_projection="base")
    cb = LCDDCallback(handle, DualController(**CTL), mask_lr=0.5)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=n_steps,
                             learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True)
    with pytest.raises(ValueError, match="optimizer holds the mask logits"):
        Trainer(model=sft, args=args, train_dataset=examples, data_collator=collate, callbacks=[cb]).train()
    opt = torch.optim.AdamW(handle.parameters()["weights"], lr=1e-3, weight_decay=0.0)
    trainer = Trainer(model=sft, args=args, train_dataset=examples, data_collator=collate, callbacks=[cb],
                      optimizers=(opt, None))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["loss"] for h in logged] == pytest.approx([r["task_loss"] for r in own.log], rel=1e-4)
    assert cb.controller._n == n_steps and cb.controller.epsilon is not None
    assert cb.controller.lam == pytest.approx(own.controller.lam, rel=1e-5)
    printed = capsys.readouterr().out  # the Trainer prints each log dict after the callbacks' on_log
    assert "'lcdd_lambda'" in printed and "'lcdd_sparsity'" in printed
    assert torch.allclose(handle.flat_theta(), own.handle.flat_theta(), atol=1e-5)
    assert not sft._forward_hooks  # removed at train end
    assert math.isfinite(cb.controller.ema)


def test_bf16_autocast_and_checkpointing_in_the_loop():
    sft, base = tiny_model("mistral", seed=1), tiny_model("mistral", seed=0)
    res = train_lcdd(sft, base, random_examples(), max_steps=2, batch_size=4, bf16=True, gradient_checkpointing=True,
                     controller=DualController(**CTL), progress=False)
    assert all(math.isfinite(r["task_loss"]) for r in res.log)
    assert all(m.weight.dtype == torch.float32 for m in res.handle.modules.values())
    assert all(getattr(layer, "gradient_checkpointing", False) for layer in L.decoder_layers(sft))
