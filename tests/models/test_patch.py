"""apply_lcdd on tiny GQA models of every family: forward and every gradient against the literal SPEC
reference (tests/helpers/lcdd_reference.py), edge masks, remove(), gradient checkpointing, bf16 autocast,
the authors' θ import, and the errors for bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lcdd_kernels as L
from lcdd_kernels.models.families import GROUPS, Dims
from lcdd_kernels.models.tiny import TINY, tiny_config, tiny_model
from lcdd_kernels.train.loop import enable_checkpointing

from tests.helpers.compare import assert_close
from tests.helpers.lcdd_reference import SpecLCDD, group_lengths, projection_names

FAMILIES = list(TINY)


def _pair(family, dtype=torch.float64):
    """(sft, base, reference-plain) tiny models: SFT and base differ everywhere."""
    return (tiny_model(family, seed=1, dtype=dtype), tiny_model(family, seed=0, dtype=dtype),
            tiny_model(family, seed=0, dtype=dtype))


def _batch(vocab=90, b=2, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids}


def _mixed_theta(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match_spec_reference(family):
    sft, base, plain = _pair(family)
    sft_state = {k: v.clone() for k, v in sft.state_dict().items()}
    theta = _mixed_theta(Dims.from_config(sft).num_masks)
    handle = L.apply_lcdd(sft, base, theta=theta, non_projection="base")
    ref = SpecLCDD(plain, sft_state, base.state_dict(), theta)
    batch = _batch()

    out = sft(**batch)
    (out.loss + 0.3 * handle.l0()).backward()
    r = ref(**batch)
    (r.loss + 0.3 * ref.l0()).backward()

    assert_close("logits", out.logits, r.logits.detach())
    for name in projection_names(sft.config):
        mod = handle.modules[name]
        assert mod.base.grad is None and not mod.base.requires_grad
        assert_close(f"dW {name}", mod.weight.grad, ref.W[name].grad)
    grad_theta = torch.cat([m.theta.grad for m in handle.masks])
    assert_close("dθ", grad_theta, ref.theta.grad)
    # frozen: embeddings, norms, lm_head
    frozen = [n for n, p in sft.named_parameters() if p.grad is not None and "lcdd_masks" not in n
              and not any(n.startswith(m) for m in handle.modules)]
    assert frozen == []


@pytest.mark.parametrize("family", FAMILIES)
def test_edge_masks_give_base_and_sft(family):
    sft, base, plain_sft = _pair(family)
    with torch.no_grad():  # the "SFT" reference: SFT projections, base everything else
        for n, p in plain_sft.named_parameters():
            p.copy_((sft if n.endswith("_proj.weight") else base).state_dict()[n])
    n = Dims.from_config(sft).num_masks
    batch = _batch()
    handle = L.apply_lcdd(sft, base, theta=-torch.ones(n), non_projection="base")
    sft.eval()
    assert_close("all off == base", sft(**batch).logits, base(**batch).logits)
    handle.set_flat_theta(torch.ones(n))
    assert_close("all on == SFT projections", sft(**batch).logits, plain_sft(**batch).logits)


@pytest.mark.parametrize("merge", [True, False])
def test_remove_round_trip(merge):
    sft, base, _ = _pair("qwen2")
    fresh = tiny_model("qwen2", seed=1, dtype=torch.float64)
    sft.lm_head.weight.requires_grad_(False)  # a user's flag must come back as it was
    flags = {n: p.requires_grad for n, p in sft.named_parameters()}
    handle = L.apply_lcdd(sft, base, theta=_mixed_theta(Dims.from_config(sft).num_masks))
    batch = _batch()
    sft.eval()
    patched_logits = sft(**batch).logits
    raw = {n: handle.modules[n].weight.detach().clone() for n in handle.modules}
    model = handle.remove(merge=merge)

    assert model is sft
    assert [(n, type(m)) for n, m in sft.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    assert list(sft.state_dict()) == list(fresh.state_dict())
    assert {n: p.requires_grad for n, p in sft.named_parameters()} == flags
    assert [n for n, _ in sft.named_buffers()] == [n for n, _ in fresh.named_buffers()]
    for m in sft.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert "masks" not in m.__dict__ and "shell" not in m.__dict__
    if merge:
        assert_close("merged logits", sft(**batch).logits, patched_logits)
    else:
        for n, w in raw.items():
            assert torch.equal(sft.get_submodule(n).weight, w)
    with pytest.raises(RuntimeError, match="removed"):
        handle.l0()
    L.apply_lcdd(sft, base).remove()  # patchable again


def test_gradient_checkpointing_same_gradients():
    grads = []
    for gc in (False, True):
        sft, base, _ = _pair("llama")
        handle = L.apply_lcdd(sft, base, theta=_mixed_theta(Dims.from_config(sft).num_masks))
        if gc:
            enable_checkpointing(sft)
        sft.train()
        sft(**_batch()).loss.backward()
        assert gc == any(getattr(layer, "gradient_checkpointing", False) for layer in L.decoder_layers(sft))
        grads.append([m.weight.grad for m in handle.modules.values()] + [m.theta.grad for m in handle.masks])
    for a, b in zip(*grads):
        assert_close("grad with checkpointing", b, a)


def test_bf16_autocast_on_cpu():
    """Under CPU bf16 autocast the patched model's logits are within twice PyTorch's own bf16 error
    (the reference run under the same autocast) of the float64 reference."""
    sft, base, plain = _pair("qwen3", dtype=torch.float32)
    sft_state = {k: v.clone() for k, v in sft.state_dict().items()}
    theta = _mixed_theta(Dims.from_config(sft).num_masks, dtype=torch.float32)
    handle = L.apply_lcdd(sft, base, theta=theta, non_projection="base")
    ref = SpecLCDD(plain, sft_state, base.state_dict(), theta)
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sft(**batch)
        lowp = ref(**batch).logits.detach()
        out.loss.backward()
    ref64 = SpecLCDD(plain.double(), {k: v.double() for k, v in sft_state.items()},
                     {k: v.double() for k, v in base.state_dict().items()}, theta.double())
    exact = ref64(**batch).logits.detach()
    assert_close("bf16 logits", out.logits.float(), exact, lowp=lowp.float(), dtype=torch.bfloat16)
    assert all(torch.isfinite(m.weight.grad).all() for m in handle.modules.values())
    assert all(m.weight.grad.dtype == torch.float32 for m in handle.modules.values())


def test_masks_per_layer_and_stats():
    sft, base, _ = _pair("qwen3", dtype=torch.float32)
    theta = _mixed_theta(Dims.from_config(sft).num_masks, dtype=torch.float32)
    handle = L.apply_lcdd(sft, base, theta=theta, non_projection="base")
    layers = L.decoder_layers(sft)
    assert [layer.lcdd_masks for layer in layers] == handle.masks
    assert list(handle.masks[0].groups) == list(GROUPS)
    assert torch.equal(handle.flat_theta(), theta)
    stats = handle.stats()
    assert stats["overall"]["active"] == int((theta > 0).sum())
    assert stats["overall"]["total"] == theta.numel()
    lengths = group_lengths(sft.config)
    per = sum(lengths)
    q_off = sum(lengths[:4])
    q = theta[per + q_off: per + q_off + lengths[4]]  # layer 1, group q
    assert torch.equal(handle.active_channels()[1]["q"], torch.nonzero(q > 0).flatten())
    assert stats["layers"][1]["groups"]["q"]["active"] == int((q > 0).sum())
    for layer, channels in zip(stats["layers"], handle.active_channels(), strict=True):
        assert {g: e["active"] for g, e in layer["groups"].items()} == {g: len(ix) for g, ix in channels.items()}
    groups = handle.parameters()
    assert len(groups["masks"]) == 2 and len(groups["weights"]) == 14
    assert {id(p) for p in sft.parameters() if p.requires_grad} == {id(p) for g in groups.values() for p in g}
    assert_close("l0", handle.l0(), torch.sigmoid(theta).sum())


def test_seed_makes_init_reproducible():
    thetas = []
    for _ in range(2):
        sft, base, _ = _pair("llama", dtype=torch.float32)
        thetas.append(L.apply_lcdd(sft, base, seed=7).flat_theta())
    assert torch.equal(*thetas)
    assert abs(thetas[0].mean().item() - 1.5) < 0.1 and abs(thetas[0].std().item() - 0.5) < 0.1


# --------------------------------------------------------------------------- authors' checkpoints


def _authors_files(tmp_path, theta, n_masks=None):
    torch.save({"theta": theta}, tmp_path / "l0_masks.pt")
    (tmp_path / "l0_config.json").write_text(json.dumps({
        "dual_budget_ratio": 0.3, "lambda_l0_init": 0.01, "l0_warmup_steps": 300,
        "n_masks": theta.numel() if n_masks is None else n_masks}))


def test_import_authors_theta(tmp_path):
    sft, base, _ = _pair("mistral", dtype=torch.float32)
    cfg = sft.config
    lengths = group_lengths(cfg)
    per = sum(lengths)
    theta = _mixed_theta(cfg.num_hidden_layers * per, seed=3, dtype=torch.float32)
    _authors_files(tmp_path, theta)
    handle = L.apply_lcdd(sft, base)
    config = L.load_authors_masks(handle, tmp_path)
    assert config["n_masks"] == theta.numel()
    assert torch.equal(handle.flat_theta(), theta)
    # the authors' layout, read the way their CircuitExtractor reads it
    for layer in range(cfg.num_hidden_layers):
        off = layer * per
        for g, n in zip(["ffn_read", "ffn_hidden", "ffn_write", "attn_read", "q", "k", "v", "attn_write"], lengths):
            want = torch.nonzero(theta[off:off + n] > 0).flatten()
            assert torch.equal(handle.active_channels()[layer][g], want), (layer, g)
            off += n


def test_import_authors_theta_errors(tmp_path):
    sft, base, _ = _pair("llama", dtype=torch.float32)
    handle = L.apply_lcdd(sft, base)
    n = Dims.from_config(sft).num_masks
    _authors_files(tmp_path, torch.randn(n + 5))
    with pytest.raises(ValueError, match=rf"needs a flat vector of {n} mask logits"):
        L.load_authors_masks(handle, tmp_path)
    _authors_files(tmp_path, torch.randn(n), n_masks=n + 1)
    with pytest.raises(ValueError, match="different runs"):
        L.load_authors_masks(handle, tmp_path)
    torch.save({"tau": torch.randn(n)}, tmp_path / "l0_masks.pt")
    with pytest.raises(KeyError, match="no 'theta'"):
        L.load_authors_masks(handle, tmp_path)
    (tmp_path / "l0_masks.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable weights-only"):
        L.load_authors_masks(handle, tmp_path)
    with pytest.raises(FileNotFoundError):
        L.load_authors_masks(handle, tmp_path / "nowhere")


# ---------------------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    sft, base, _ = _pair("llama", dtype=torch.float32)
    n = Dims.from_config(sft).num_masks
    with pytest.raises(ValueError, match="other dimensions.*intermediate_size"):
        L.apply_lcdd(sft, tiny_model("llama", intermediate_size=64))
    with pytest.raises(ValueError, match="SFT model is a llama model but the base is a qwen3"):
        L.apply_lcdd(sft, tiny_model("qwen3"))
    with pytest.raises(ValueError, match="lacks .* parameters"):
        L.apply_lcdd(sft, {k: v for k, v in base.state_dict().items() if "layers.1." not in k})
    sd = dict(base.state_dict())
    sd["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="other shapes"):
        L.apply_lcdd(sft, sd)
    with pytest.raises(ValueError, match="base is the SFT model itself"):
        L.apply_lcdd(sft, sft)
    with pytest.raises(TypeError, match="state dict"):
        L.apply_lcdd(sft, 3)
    with pytest.raises(ValueError, match=rf"needs a flat vector of {n}"):
        L.apply_lcdd(sft, base, theta=torch.zeros(n - 1))
    # the failed calls above left the model untouched
    assert not any(hasattr(layer, "lcdd_masks") for layer in L.decoder_layers(sft))
    assert all(p.requires_grad for p in sft.parameters())
    handle = L.apply_lcdd(sft, base)
    with pytest.raises(ValueError, match="already patched"):
        L.apply_lcdd(sft, base)
    handle.remove()


def test_unsupported_model_lists_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'.*llama, mistral, qwen2, qwen3"):
        L.apply_lcdd(gpt2, gpt2.state_dict())
    with pytest.raises(ValueError, match="unsupported"):
        L.get_family(nn.Linear(2, 2))


def test_state_dict_base_shares_memory_when_possible():
    sft, base, _ = _pair("llama", dtype=torch.float32)
    handle = L.apply_lcdd(sft, base)
    name = "model.layers.0.mlp.down_proj"
    assert handle.modules[name].base.data_ptr() == base.get_submodule(name).weight.data_ptr()
    assert tiny_config("llama").num_key_value_heads < tiny_config("llama").num_attention_heads  # GQA
