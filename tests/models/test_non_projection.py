"""apply_lcdd(non_projection="sft" | "base"): starting LCDD from the SFT model the user gave.

In "sft" mode (the authors' recipe) the SFT model's norms and biases are kept and trained and its
embeddings / lm_head kept frozen: with every mask on the patched model is the SFT model, and in
train mode logits and every gradient equal the literal SPEC reference and a re-statement of the
authors' parametrisation (tests/helpers/lcdd_reference.py). "base" is the strict mode. Differences are
reported on the handle and in the log either way."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.models.families import Dims
from lcdd_kernels.models.tiny import TINY, tiny_model

from tests.helpers.compare import assert_close
from tests.helpers.lcdd_reference import AuthorsLCDD, SpecLCDD, projection_names, train_non_projection
from tests.helpers.sft_pairs import sft_pair

FAMILIES = list(TINY)


def _batch(b=2, t=11, seed=0):
    ids = torch.randint(3, 90, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _theta(model, seed=0, dtype=torch.float64):
    return torch.randn(Dims.from_config(model).num_masks, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _trained_other(model) -> list[str]:
    """Norm weights and projection biases: what "sft" mode trains besides W and θ."""
    return [n for n, _ in model.named_parameters()
            if not n.endswith("_proj.weight") and "embed_tokens" not in n and not n.startswith("lm_head")]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_masks_on_is_the_sft_model(family):
    sft, base = sft_pair(family, torch.float32)
    ref64 = copy.deepcopy(sft).double().eval()
    plain = copy.deepcopy(sft).eval()
    batch = {"input_ids": _batch()["input_ids"]}
    want64 = ref64(**batch).logits.detach()
    want32 = plain(**batch).logits.detach()
    n = Dims.from_config(sft).num_masks
    strict = L.apply_lcdd(copy.deepcopy(sft), base, theta=torch.full((n,), 50.0), non_projection="base")
    strict.model.eval()
    handle = L.apply_lcdd(sft, base, theta=torch.full((n,), 50.0))
    assert handle.non_projection == "sft"
    for mode in ("eval", "train"):
        getattr(sft, mode)()
        got = sft(**batch).logits.detach()
        assert_close(f"{mode}: all masks on == SFT model", got, want64, lowp=want32, dtype=torch.float32)
    # strict mode is not the SFT model when the SFT model moved norms or biases
    assert (strict.model(**batch).logits.detach() - want32).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_logits_and_every_gradient_equal_spec_and_authors(family):
    sft, base = sft_pair(family)
    base_state = base.state_dict()
    theta = _theta(sft)
    batch = _batch()
    others = _trained_other(sft)

    spec = SpecLCDD(copy.deepcopy(sft), sft.state_dict(), base_state, theta)
    spec_other = dict(zip(others, train_non_projection(spec.model, others)))
    authors = AuthorsLCDD(copy.deepcopy(sft), base_state, theta)
    handle = L.apply_lcdd(sft, base, theta=theta)
    params = dict(sft.named_parameters())
    assert {id(p) for p in sft.parameters() if p.requires_grad} == \
        {id(p) for g in handle.parameters().values() for p in g}
    assert set(n for n in others) <= {n for n, p in params.items() if p.requires_grad}

    runs = {}
    for name, model, l0 in (("ours", sft, handle.l0), ("spec", spec, spec.l0),
                            ("authors", authors, lambda: torch.sigmoid(authors.theta).sum())):
        if hasattr(model, "train"):
            model.train()
        else:
            model.model.train()
        out = model(**batch)
        (out.loss + 0.3 * l0()).backward()
        runs[name] = out.logits.detach()
    assert_close("logits ours vs spec", runs["ours"], runs["spec"])
    assert_close("logits ours vs authors", runs["ours"], runs["authors"])
    a_params = dict(authors.model.named_parameters())
    for name in projection_names(sft.config):
        g = handle.modules[name].weight.grad
        assert_close(f"dW {name} (spec)", g, spec.W[name].grad)
        assert_close(f"dW {name} (authors)", g, authors.weight(name).grad)
    dtheta = torch.cat([m.theta.grad for m in handle.masks])
    assert_close("dθ (spec)", dtheta, spec.theta.grad)
    assert_close("dθ (authors)", dtheta, authors.theta.grad)
    for name in others:
        assert params[name].grad is not None, name
        assert_close(f"d {name} (spec)", params[name].grad, spec_other[name].grad)
        assert_close(f"d {name} (authors)", params[name].grad, a_params[name].grad)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert params[name].grad is None and a_params[name].grad is None


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_authors_checkpoint_and_their_sft_model_give_their_lcdd_model_on_the_base(family, tmp_path):
    """Their l0_masks.pt with their SFT model: our carrier on the base reproduces their LCDD model
    (binary masks, eval) -- including the SFT norms and biases they keep."""
    sft, base = sft_pair(family)
    theta = _theta(sft, seed=4, dtype=torch.float32)
    torch.save({"theta": theta}, tmp_path / "l0_masks.pt")
    authors = AuthorsLCDD(copy.deepcopy(sft), base.state_dict(), theta)
    authors.model.eval()
    ids = _batch()["input_ids"]
    want = authors.model(input_ids=ids).logits.detach()

    handle = L.apply_lcdd(sft, base)
    L.load_authors_masks(handle, tmp_path)
    carrier = L.extract_carrier(handle)
    carrier.save(tmp_path / "c")
    served = copy.deepcopy(base)
    L.apply_carrier(served, L.load_carrier(tmp_path / "c"))
    served.eval()
    assert_close("base + carrier == authors' LCDD model", served(input_ids=ids).logits.detach(), want)


def test_differences_are_reported_and_logged(caplog):
    sft, base = sft_pair("qwen2")
    names = _trained_other(sft)
    with caplog.at_level(logging.INFO, logger="lcdd_kernels.models"):
        handle = L.apply_lcdd(copy.deepcopy(sft), base)
    assert sorted(handle.differences) == sorted(names)
    sd, bd = sft.state_dict(), base.state_dict()
    for n, d in handle.differences.items():
        delta = (sd[n] - bd[n])
        assert d["max_abs"] == pytest.approx(float(delta.abs().max()))
        assert d["relative"] == pytest.approx(float(delta.norm() / bd[n].norm()))
        assert d["numel"] == sd[n].numel()
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"{len(names)} non-projection parameters of the SFT model differ" in msg
    assert "keep their SFT values" in msg and "non_projection='base'" in msg
    # the patched model keeps the SFT values; norms and biases train, embeddings and lm_head do not
    params = dict(handle.model.named_parameters())
    assert all(torch.equal(params[n], sd[n]) for n in names)
    assert all(params[n].requires_grad for n in names)
    assert not params["model.embed_tokens.weight"].requires_grad and not params["lm_head.weight"].requires_grad
    weights = {id(p) for p in handle.parameters()["weights"]}
    assert all(id(params[n]) in weights for n in names)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lcdd_kernels.models"):
        strict = L.apply_lcdd(copy.deepcopy(sft), base, non_projection="base")
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "set to the base values and frozen" in warn[0].getMessage()
    assert sorted(strict.differences) == sorted(names)
    params = dict(strict.model.named_parameters())
    assert all(torch.equal(params[n], bd[n]) and not params[n].requires_grad for n in names)
    assert strict.dense_parameters() == {}
    assert len(strict.parameters()["weights"]) == 14


def test_equal_non_projection_parameters_report_nothing(caplog):
    base = tiny_model("llama", seed=0)
    sft = copy.deepcopy(base)
    with torch.no_grad():
        sft.model.layers[0].mlp.up_proj.weight.add_(0.1)
    trained = _trained_other(sft)
    values = sum(p.numel() for n, p in sft.named_parameters() if n in trained)
    with caplog.at_level(logging.INFO, logger="lcdd_kernels.models"):
        handle = L.apply_lcdd(sft, base)
    assert handle.differences == {} and handle.dense_parameters() == {}
    # no value changes, but the norms start training: the log says how many and the switch
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"trains its {len(trained)} norm weights and projection biases ({values} values)" in msg
    assert "non_projection='base'" in msg


def test_changed_embeddings_are_carried_with_a_warning(caplog):
    sft, base = sft_pair("llama", torch.float32, frozen_embeddings=False)
    handle = L.apply_lcdd(sft, base)
    with caplog.at_level(logging.WARNING, logger="lcdd_kernels.models"):
        c = L.extract_carrier(handle)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(c.dense)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("model.embed_tokens.weight densely (101x48" in m for m in msgs)


def test_lcdd_trained_norms_are_carried():
    """A norm equal to the base at the start but trained during LCDD differs at extraction."""
    base = tiny_model("qwen3", seed=0)
    sft = copy.deepcopy(base)
    handle = L.apply_lcdd(sft, base)
    assert handle.dense_parameters() == {}
    with torch.no_grad():
        sft.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
    assert list(handle.dense_parameters()) == ["model.layers.1.post_attention_layernorm.weight"]


def test_bad_mode():
    sft, base = sft_pair("llama", torch.float32)
    with pytest.raises(ValueError, match="non_projection must be 'sft' .* or 'base' .*got 'strict'"):
        L.apply_lcdd(sft, base, non_projection="strict")
    assert not any(hasattr(layer, "lcdd_masks") for layer in L.decoder_layers(sft))
