"""Carriers with dense parts (norm weights, projection biases of the LCDD model) through save ->
load -> apply_carrier / merge_carrier_ / CarrierBank: base + carrier equals the LCDD model, removal
restores the base bit for bit, and a bank mixing a dense-part carrier, a sparse-only one and −1
in one batch gives each sequence what its carrier gives alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.carriers.layout import CONFIG_NAME
from lcdd_kernels.models.families import Dims
from lcdd_kernels.models.tiny import TINY, tiny_model

from tests.helpers.sft_pairs import sft_pair

FAMILIES = list(TINY)


def _ids():
    return torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(2))


def _bits(t):
    return t.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).clone()


def _make(family, tmp_path, dtype=torch.float32):
    """(base, [dense carrier, sparse-only carrier] loaded from disk, their LCDD models' logits)."""
    out, logits = [], []
    for seed, mode in ((12, "sft"), (13, "base")):
        sft, base = sft_pair(family, dtype, seed=seed)
        theta = torch.randn(Dims.from_config(sft).num_masks, generator=torch.Generator().manual_seed(seed))
        handle = L.apply_lcdd(sft, base, theta=theta, non_projection=mode)
        sft.eval()
        with torch.no_grad():
            logits.append(sft(input_ids=_ids()).logits)
        L.extract_carrier(handle, include_theta=False).save(tmp_path / mode)
        out.append(L.load_carrier(tmp_path / mode))
    assert out[0].dense and not out[1].dense
    return base.eval(), out, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_and_remove(family, tmp_path):
    base, (dense, _), (want, _) = _make(family, tmp_path)
    ids = _ids()
    before = {n: _bits(p) for n, p in base.named_parameters()}
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    h = L.apply_carrier(base, dense)
    with torch.no_grad():
        got = base(input_ids=ids).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        h.enable(False)
        assert torch.equal(base(input_ids=ids).logits, base_logits)
        h.enable(True)
        assert torch.equal(base(input_ids=ids).logits, got)
    h.remove()
    assert all(torch.equal(_bits(p), before[n]) for n, p in base.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_bit_exact(family, tmp_path):
    base, (dense, sparse), (want, want_sparse) = _make(family, tmp_path)
    ids = _ids()
    before = {n: _bits(p) for n, p in base.named_parameters()}
    L.merge_carrier_(base, dense)
    with torch.no_grad():
        got = base(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    changed = {n for n, p in base.named_parameters() if not torch.equal(_bits(p), before[n])}
    assert set(dense.dense) <= changed
    L.unmerge_carrier_(base, dense)
    assert all(torch.equal(_bits(p), before[n]) for n, p in base.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_bank_mixes_dense_sparse_and_base(family, tmp_path):
    base, carriers, wants = _make(family, tmp_path)
    ids = _ids()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = copy.deepcopy(base)
    bank = L.apply_carrier_bank(model, carriers)
    assert any(isinstance(m, L.carriers.bank.BankNorm) for m in model.modules())
    with torch.no_grad(), bank.carriers([0, 1, -1, 0]):
        out = model(input_ids=ids).logits
    for row, want in enumerate([wants[0], wants[1], base_logits, wants[0]]):
        err = (out[row] - want[row]).abs().max().item()
        assert err <= 1e-5 * want[row].abs().max().item(), (row, err)
    with torch.no_grad(), bank.carriers(None):
        assert torch.equal(model(input_ids=ids).logits, base_logits)  # no carrier: the base path
    bank.remove(0)
    with torch.no_grad(), bank.carriers([1, -1, 1, -1]):
        out = model(input_ids=ids).logits
    assert (out[0] - wants[1][0]).abs().max() <= 1e-5 * wants[1][0].abs().max()
    before = {n: _bits(p) for n, p in base.named_parameters()}
    restored = bank.restore()
    assert [type(m) for m in restored.modules()] == [type(m) for m in base.modules()]
    assert all(torch.equal(_bits(p), before[n]) for n, p in restored.named_parameters())


def test_bank_generate_per_sequence(tmp_path):
    base, carriers, _ = _make("qwen2", tmp_path)
    ids = _ids()
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    alone = []
    for c in carriers:
        m = copy.deepcopy(base)
        L.apply_carrier(m, c)
        alone.append(m.generate(input_ids=ids, attention_mask=mask, **gen))
    model = copy.deepcopy(base)
    bank = L.apply_carrier_bank(model, carriers)
    with bank.carriers([1, 0, 0, 1]):
        mixed = model.generate(input_ids=ids, attention_mask=mask, **gen)
    for row, c in enumerate([1, 0, 0, 1]):
        assert torch.equal(mixed[row], alone[c][row]), row


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return _make("qwen2", tmp_path_factory.mktemp("q2"))


def _with_dense(c, **dense):
    return L.Carrier(c.modules, c.family, c.dims, c.dtype, c.base_fingerprint, c.base_name, None, {}, dense)


def test_dense_part_of_wrong_shape_or_dtype(qwen2):
    _, (dense, _), _ = qwen2
    q = "model.layers.0.self_attn.q_proj.bias"
    with pytest.raises(ValueError, match=rf"dense part '{q}': has shape \(49,\), expected \(48,\)"):
        _with_dense(dense, **{q: torch.zeros(49)})
    with pytest.raises(ValueError, match="dense part 'model.norm.weight': has dtype torch.float16 but the carrier's"):
        _with_dense(dense, **{"model.norm.weight": torch.ones(48, dtype=torch.float16)})
    with pytest.raises(ValueError, match="norm weight has hidden_size 48 or head_dim 8"):
        _with_dense(dense, **{"model.norm.weight": torch.ones(47)})
    with pytest.raises(ValueError, match="holds NaN or inf"):
        _with_dense(dense, **{"model.norm.weight": torch.full((48,), float("nan"))})
    with pytest.raises(ValueError, match="is a projection weight"):
        _with_dense(dense, **{"model.layers.0.mlp.up_proj.weight": torch.ones(80, 48)})


def test_dense_part_the_model_lacks_is_refused_everywhere(qwen2):
    """A qwen2 carrier's q/k/v biases on a qwen2 model built without them."""
    base, (dense, _), _ = qwen2
    other = copy.deepcopy(base)
    for layer in other.model.layers:
        for p in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, p).bias = None
    before = {n: _bits(p) for n, p in other.named_parameters()}
    pattern = "dense part 'model.layers.0.self_attn.q_proj.bias' names a parameter this model does not have"
    with pytest.raises(ValueError, match=pattern):
        L.apply_carrier(other, dense, allow_fingerprint_mismatch=True)
    with pytest.raises(ValueError, match=pattern):
        L.merge_carrier_(other, dense, allow_fingerprint_mismatch=True)
    with pytest.raises(ValueError, match=pattern):
        L.apply_carrier_bank(other, [dense], allow_fingerprint_mismatch=True)
    assert all(type(m) is not L.carriers.bank.BankLinear for m in other.modules())
    assert all(torch.equal(_bits(p), before[n]) for n, p in other.named_parameters())
    wrong = _with_dense(dense, **{"model.norm.weight": torch.ones(48)})
    small = tiny_model("qwen2", seed=0, hidden_size=48)
    small.model.norm.weight = torch.nn.Parameter(torch.ones(12))
    for apply in (L.apply_carrier, L.merge_carrier_, lambda m, c, **k: L.apply_carrier_bank(m, [c], **k)):
        with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(48,\) but the model's parameter has \(12,\)"):
            apply(small, wrong, allow_fingerprint_mismatch=True)


def test_bank_refuses_embedding_dense_parts(tmp_path):
    sft, base = sft_pair("llama", torch.float32, frozen_embeddings=False)
    c = L.extract_carrier(L.apply_lcdd(sft, base), include_theta=False)
    assert "model.embed_tokens.weight" in c.dense
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="'model.embed_tokens.weight' is not a norm weight or projection bias.*apply_carrier"):
        L.apply_carrier_bank(model, [c])
    L.apply_carrier(model, c).remove()  # alone it works


def test_v1_file_with_dense_keys_is_refused(qwen2, tmp_path):
    """Format 1 had no dense parts: a v1 config over a file with .carrier_dense keys is refused."""
    _, (dense, _), _ = qwen2
    d = tmp_path / "c"
    dense.save(d)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["format_version"] = 1
    for k in ("dense_parameters", "tensor_sha256", "theta_sha256"):
        cfg.pop(k)
    cfg["num_parameters"].pop("dense")
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.input_layernorm.weight.carrier_dense'"):
        L.load_carrier(d)


def test_inspect_shows_dense_parts_and_their_share(qwen2, tmp_path, capsys):
    from lcdd_kernels.cli import main

    _, (dense, sparse), _ = qwen2
    dense.save(tmp_path / "d")
    sparse.save(tmp_path / "s")
    assert main(["inspect", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    nb = dense.nbytes()
    assert f"dense parts: {len(dense.dense)} parameters" in out and f"{nb['dense'] / nb['total']:.1%}" in out
    assert "bias: 6 tensors" in out and "norm: 5 tensors" in out
    assert main(["inspect", str(tmp_path / "d"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["dense_parameters"]) == set(dense.dense)
    assert info["size"]["stored_bytes"] == nb and info["size"]["dense_share_of_bytes"] == nb["dense"] / nb["total"]
    assert main(["inspect", str(tmp_path / "s")]) == 0
    assert "dense parts: none" in capsys.readouterr().out


def test_eraser_channels_stay_the_sparse_write_channels(qwen2):
    _, (dense, _), _ = qwen2
    sparse_only = L.Carrier(dense.modules, dense.family, dense.dims, dense.dtype, dense.base_fingerprint)
    for kind in ("write", "all_residual"):
        a, b = L.carrier_channels(dense, kind), L.carrier_channels(sparse_only, kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(len(ix) < dense.dims.hidden_size for ix in a.values())  # not the whole residual stream
