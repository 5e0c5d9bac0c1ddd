"""SFT-Eraser: the batched loss and its gradient equal SPEC §5 written one prompt at a time."""


import pytest
import torch

from lcdd_kernels.eraser.eraser import (EraserOptions, EraserRun, base_targets, eraser_loss,
                                        optimize_eraser)
from lcdd_kernels.models.tiny import tiny_model

LENGTHS = (5, 2, 9, 3, 12)


def _prompts(vocab, lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def _pair(family="llama", dtype=torch.float64):
    base = tiny_model(family, seed=0, dtype=dtype).eval()
    lcdd = tiny_model(family, seed=0, dtype=dtype).eval()
    with torch.no_grad():  # a "carrier": a few rows of down_proj / o_proj changed
        for layer in lcdd.model.layers:
            layer.mlp.down_proj.weight[[1, 7, 20]] += 0.3 * torch.randn(3, layer.mlp.down_proj.in_features, dtype=dtype)
            layer.self_attn.o_proj.weight[[7, 30]] += 0.3 * torch.randn(2, layer.self_attn.o_proj.in_features, dtype=dtype)
    return lcdd, base


CHANNELS = {0: torch.tensor([1, 7, 20, 30]), 1: torch.tensor([1, 7, 20, 30])}


def _layer_out(model, layer, inputs_embeds):
    seen = {}
    h = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    out = model(inputs_embeds=inputs_embeds)
    h.remove()
    return seen["h"], out.logits


def literal_loss(model, base, T, prompts, all_prompts, channels, kappa, k, l2, kl_only=False):
    """SPEC §5, one prompt at a time, no padding, no masks, full logits everywhere."""
    emb = model.get_input_embeddings()
    mu = {}
    for layer, S in channels.items():  # μ_ℓ: base model, no trigger, mean over all prompts
        acts = [_layer_out(base, layer, emb(x)[None])[0][0, -1, S] for x in all_prompts]
        mu[layer] = torch.stack(acts).mean(0)
    acts = {layer: [] for layer in channels}
    kls = []
    for x in prompts:
        e = torch.cat([T, emb(x)])[None]
        for layer, S in channels.items():
            h, logits = _layer_out(model, layer, e)
            acts[layer].append(h[0, -1, S])
        logp = logits[0].log_softmax(-1)                       # (L + n, V)
        logp_base = base(input_ids=x[None]).logits[0].log_softmax(-1)  # (n, V)
        n, L = x.numel(), T.shape[0]
        per_pos = []
        for t in range(max(0, n - k), n):                      # the last k prompt positions
            p = logp_base[t].exp()
            per_pos.append((p * (logp_base[t] - logp[L + t])).sum())
        kls.append(torch.stack(per_pos).mean())
    mse = torch.stack([((torch.stack(acts[layer]).mean(0) - mu[layer]) ** 2).mean() for layer in channels]).mean()
    kl = torch.stack(kls).mean()
    reg = torch.stack([(T[t] ** 2).sum() for t in range(T.shape[0])]).mean()
    return (0 if kl_only else mse) + kappa * kl + l2 * reg


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("kappa, kl_only", [(0.7, False), (0.0, False), (0.7, True)])
def test_batched_loss_and_gradient_equal_literal(family, kappa, kl_only):
    model, base = _pair(family)
    prompts = _prompts(model.config.vocab_size)
    opts = EraserOptions(trigger_length=3, kappa=kappa, tail_k=4, l2=0.1, kl_only=kl_only)
    channels = {} if kl_only else CHANNELS
    T = (0.5 * torch.randn(3, model.config.hidden_size, dtype=torch.float64)).requires_grad_(True)
    idx = torch.tensor([4, 0, 2, 1])
    with torch.no_grad():
        targets = base_targets(base, prompts, channels, opts.tail_k, batch_size=2, need_kl=kappa > 0)
    loss, parts = eraser_loss(model, T, prompts, idx, targets, channels, opts)
    (g,) = torch.autograd.grad(loss, T)
    ref = literal_loss(model, base, T, [prompts[i] for i in idx], prompts, CHANNELS, kappa, opts.tail_k,
                       opts.l2, kl_only)
    (g_ref,) = torch.autograd.grad(ref, T)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    # Hugging Face RMSNorm computes in float32 even in a float64 model, so gradients summed in a
    # different order (one forward vs one per prompt and layer) differ at ~1e-7 relative; a padding
    # leak or a wrong position id changes them at O(1).
    scale = g_ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6 * scale)
    assert parts["loss"] == pytest.approx(ref.item(), rel=1e-10)


def test_short_run_lowers_the_loss_and_is_reproducible():
    model, base = _pair("llama", torch.float32)
    prompts = _prompts(model.config.vocab_size, lengths=(4, 6, 8, 5, 7, 9, 3, 6))
    kw = dict(steps=30, batch_size=4, lr=0.05, trigger_length=4, tail_k=3, progress=False)
    res = optimize_eraser(model, base, prompts, CHANNELS, **kw)
    loss = res.curves["loss"]
    assert len(loss) == 30 and set(res.curves) == {"loss", "mse", "kl", "l2"}
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:5]) / 5, loss
    assert res.best_loss == min(loss) and loss[res.best_step] == res.best_loss
    assert res.trigger.shape == (4, model.config.hidden_size) and res.trigger.dtype == torch.float32
    assert float(res.trigger.norm(dim=-1).max()) <= 1.0 + 1e-5 or res.best_step == 0
    again = optimize_eraser(model, base, prompts, CHANNELS, **kw)
    assert torch.equal(again.trigger, res.trigger)
    # the model's weights received no gradient
    assert all(p.grad is None for p in model.parameters())


def test_reproducible_on_two_threads_at_demo_size():
    """The same trigger bit for bit on 2 threads with the demo's sizes (d 128, 16 prompts, L 20).
    Laying the trigger out through an index table made its gradient an atomic index_put_ on a
    multi-threaded CPU, and the trigger differed from run to run."""
    model, base = (tiny_model("llama", seed=s, hidden_size=128, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32) for s in (1, 0))
    prompts = _prompts(model.config.vocab_size, lengths=(9, 14, 6, 20) * 4)
    kw = dict(steps=6, batch_size=16, lr=3e-3, trigger_length=20, tail_k=8, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [optimize_eraser(model, base, prompts, CHANNELS, **kw).trigger for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], t) for t in runs[1:])


def test_random_channel_ablation_keeps_the_per_layer_budget():
    model, base = _pair("llama", torch.float32)
    prompts = _prompts(model.config.vocab_size)
    channels = {0: torch.tensor([1, 2, 3]), 1: torch.tensor([5])}
    run = EraserRun(model, base, prompts, channels, options=EraserOptions(random_channels=True, seed=1),
                    progress=False)
    run.close()
    assert {k: v.numel() for k, v in run.channels.items()} == {0: 3, 1: 1}
    assert run.channels_kind == "explicit+random"
    assert any(not torch.equal(run.channels[k], channels[k]) for k in channels)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "prompt list is empty"),
    (dict(prompts=[[1, 2], []]), "sequence 1 is empty"),
    (dict(prompts=["hello"]), "pass tokenizer="),
    (dict(channels={5: [1]}), "layer 5 does not exist"),
    (dict(channels={0: [48]}), "out of range"),
    (dict(channels={0: []}), "no layer has a channel"),
    (dict(kappa=-1.0), "kappa must be >= 0"),
    (dict(channel_kind="reads"), "channel_kind must be one of"),
    (dict(kl_only=True, kappa=0.0), "nothing to optimise"),
    (dict(stepz=3), "unknown option"),
])
def test_bad_input(kwargs, match):
    model, base = _pair("llama", torch.float32)
    args = dict(prompts=[[3, 4, 5]], channels=CHANNELS)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        optimize_eraser(model, base, args.pop("prompts"), args.pop("channels"), steps=1, progress=False, **args)


def test_mismatched_base_model():
    model = tiny_model("llama")
    base = tiny_model("llama", vocab_size=50)
    with pytest.raises(ValueError, match="differ in vocab_size"):
        optimize_eraser(model, base, [[3, 4]], CHANNELS, steps=1, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (SDPA's GPU kernels with padding masks)")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batched_loss_and_gradient_on_cuda(family):
    """fp32 on the GPU's attention kernels (padded rows must not leak NaN), then a bf16 smoke run."""
    model, base = (m.float().cuda() for m in _pair(family))
    prompts = _prompts(model.config.vocab_size)
    channels = {k: v.cuda() for k, v in CHANNELS.items()}
    opts = EraserOptions(trigger_length=3, kappa=0.7, tail_k=4, l2=0.1)
    T = (0.5 * torch.randn(3, model.config.hidden_size, device="cuda")).requires_grad_(True)
    idx = torch.tensor([4, 0, 2, 1])
    with torch.no_grad():
        targets = base_targets(base, [p.cuda() for p in prompts], channels, opts.tail_k, batch_size=2)
    loss, _ = eraser_loss(model, T, [p.cuda() for p in prompts], idx, targets, channels, opts)
    (g,) = torch.autograd.grad(loss, T)
    ref = literal_loss(model, base, T, [prompts[i].cuda() for i in idx], [p.cuda() for p in prompts], channels,
                       opts.kappa, opts.tail_k, opts.l2)
    (g_ref,) = torch.autograd.grad(ref, T)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4 * g_ref.abs().max().item())
    res = optimize_eraser(model.bfloat16(), base.bfloat16(), prompts, channels, steps=3, batch_size=4,
                          trigger_length=3, tail_k=4, progress=False)
    assert all(torch.isfinite(torch.tensor(res.curves["loss"]))) and torch.isfinite(res.trigger).all()
