"""CarrierBank on tiny Hugging Face models: per-sequence carriers through model(...) and generate
equal each carrier applied alone, restore(), refusing carriers of another base, and bit-exact
merge / unmerge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lcdd_kernels as L
from lcdd_kernels import _backend
from lcdd_kernels.models.families import module_paths
from lcdd_kernels.models.patch import apply_lcdd
from lcdd_kernels.models.tiny import tiny_model

BACKENDS = ["torch", "triton"] + (["cpp"] if _backend.native_available() else [])


def _carrier(family, sft_seed, base_seed=0, dtype=torch.float32):
    handle = apply_lcdd(tiny_model(family, seed=sft_seed, dtype=dtype), tiny_model(family, seed=base_seed, dtype=dtype),
                        seed=sft_seed, init_mean=0.0, init_std=1.0, non_projection="base")
    return L.extract_carrier(handle, include_theta=False)


@pytest.fixture(scope="module")
def carriers():
    return [_carrier("qwen3", s) for s in (1, 2, 3)]


def _base(dtype=torch.float32):
    model = tiny_model("qwen3", seed=0, dtype=dtype).eval()
    model.config.use_cache = True
    return model


def _batch():
    # four prompts of different lengths, left padded (what generate expects)
    g = torch.Generator().manual_seed(3)
    lengths = [7, 3, 5, 6]
    ids = torch.zeros(4, 7, dtype=torch.long)
    mask = torch.zeros(4, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 7 - n:] = torch.randint(4, 90, (n,), generator=g)
        mask[i, 7 - n:] = 1
    return ids, mask


def _generate(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                          pad_token_id=0, eos_token_id=None, use_cache=True)


def test_bank_generates_what_each_carrier_generates_alone(carriers):
    ids, mask = _batch()
    alone = []
    for c in carriers:
        model = _base()
        L.apply_carrier(model, c)
        alone.append(_generate(model, ids, mask))
    plain = _generate(_base(), ids, mask)
    assert all(not torch.equal(a, plain) for a in alone)  # the carriers change what is generated
    model = _base()
    bank = L.apply_carrier_bank(model, carriers)
    with bank.carriers([0, 1, 2, None]):
        mixed = _generate(model, ids, mask)
    for i in range(3):
        assert torch.equal(mixed[i], alone[i][i]), f"sequence {i} (carrier {i})"
    assert torch.equal(mixed[3], plain[3])
    with bank.carriers(1):  # one id for every sequence
        assert torch.equal(_generate(model, ids, mask), alone[1])
    assert torch.equal(_generate(model, ids, mask), plain)  # outside a context: the base model


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_logits_match_apply_carrier(carriers, backend):
    ids, mask = _batch()
    refs = []
    for c in carriers:
        model = _base()
        L.apply_carrier(model, c)
        with torch.no_grad():
            refs.append(model(input_ids=ids, attention_mask=mask).logits)
    model = _base()
    bank = L.apply_carrier_bank(model, {"a": carriers[0], "b": carriers[1], "c": carriers[2]})
    with torch.no_grad(), L.use_backend(backend), bank.carriers(["c", "a", "b", "a"]):
        out = model(input_ids=ids, attention_mask=mask).logits
    for row, c in enumerate([2, 0, 1, 0]):
        err = (out[row] - refs[c][row]).abs().max().item()
        assert err <= 1e-4 * refs[c][row].abs().max().item(), (row, err)


def test_restore_and_add_remove(carriers):
    ids, mask = _batch()
    model = _base()
    linears = {p: model.get_submodule(p) for _, _, p in module_paths(model)}
    with torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    bank = L.apply_carrier_bank(model)
    assert len(bank) == 0 and isinstance(model.get_submodule(next(iter(linears))), L.carriers.bank.BankLinear)
    cid = bank.add(carriers[0], name="first")
    with torch.no_grad(), bank.carriers([cid] * 4):
        with_carrier = model(input_ids=ids, attention_mask=mask).logits
    assert (with_carrier - base_logits).abs().max() > 1e-2
    bank.remove("first")
    with pytest.raises(KeyError, match="no carrier named 'first'"):
        with bank.carriers(["first"] * 4):
            pass
    restored = bank.restore()
    assert restored is model
    assert all(model.get_submodule(p) is m and type(m) is nn.Linear for p, m in linears.items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base_logits)
    with pytest.raises(RuntimeError, match="not applied to a model"):
        bank.restore()


def test_bank_refuses_carriers_of_another_base(carriers):
    other = tiny_model("qwen3", seed=5).eval()
    with pytest.raises(ValueError, match="base model mismatch"):
        L.apply_carrier_bank(other, carriers[:1])
    bank = L.apply_carrier_bank(other, carriers[:1], allow_fingerprint_mismatch=True)
    assert bank.ids == [0]
    bank.restore()
    bank = L.apply_carrier_bank(_base())
    with pytest.raises(ValueError, match="the carrier is for a llama model"):
        bank.add(_carrier("llama", 1))
    with pytest.raises(TypeError, match="takes Carrier objects"):
        bank.add({"model.layers.0.mlp.up_proj": (torch.zeros(0, 0), torch.zeros(0, dtype=torch.int32),
                                                 torch.zeros(0, dtype=torch.int32))})


def test_bank_context_errors(carriers):
    ids, mask = _batch()
    model = _base()
    bank = L.apply_carrier_bank(model, carriers)
    with pytest.raises(KeyError, match="no carrier with id 7"):
        with bank.carriers([0, 7]):
            pass
    with pytest.raises(ValueError, match="got 3 carrier ids but the model runs a batch of 4"):
        with torch.no_grad(), bank.carriers([0, 1, 2]):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="requires grad, but this op computes gradients for x only"):
        with bank.carriers([0, 1, 2, 0]):
            model(input_ids=ids, attention_mask=mask)
    model.requires_grad_(False)  # frozen weights: gradients reach the inputs (e.g. a soft prompt)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with bank.carriers([0, 1, 2, 0]):
        model(inputs_embeds=emb, attention_mask=mask).logits.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="apply_carrier_bank: model.layers.0.self_attn.q_proj is a BankLinear"):
        L.apply_carrier_bank(model)


def _bits(t):
    return t.detach().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_is_bit_exact(carriers, dtype):
    ids, mask = _batch()
    model = _base(dtype)
    before = {n: _bits(p) for n, p in model.named_parameters()}
    ref = _base(dtype)
    lowp = dtype != torch.float32  # a rounded copy of the fp32 base: its fingerprint differs
    L.apply_carrier(ref, carriers[0], allow_fingerprint_mismatch=lowp)
    L.merge_carrier_(model, carriers[0], allow_fingerprint_mismatch=lowp)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits.float()
        want = ref(input_ids=ids, attention_mask=mask).logits.float()
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    assert (got - want).abs().max() <= tol * want.abs().max()
    changed = [n for n, p in model.named_parameters() if not torch.equal(_bits(p), before[n])]
    assert changed and all("proj" in n for n in changed)
    # a second carrier on top, checked against the verified base
    L.merge_carrier_(model, carriers[1], allow_fingerprint_mismatch=lowp)
    with pytest.raises(ValueError, match="merged after this one"):
        L.unmerge_carrier_(model, carriers[0])
    with pytest.raises(ValueError, match="already merged"):
        L.merge_carrier_(model, carriers[1], allow_fingerprint_mismatch=lowp)
    L.unmerge_carrier_(model, carriers[1])
    L.unmerge_carrier_(model, carriers[0])
    for n, p in model.named_parameters():
        assert torch.equal(_bits(p), before[n]), n
    with pytest.raises(ValueError, match="not merged into the model"):
        L.unmerge_carrier_(model, carriers[0])


def test_merge_refuses_another_base(carriers):
    other = tiny_model("qwen3", seed=5)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="base model mismatch"):
        L.merge_carrier_(other, carriers[0])
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())  # nothing changed


def test_merged_model_serves_a_bank(carriers):
    # a bank over a model with a merged carrier: its fingerprint is no longer the base's
    model = _base()
    L.merge_carrier_(model, carriers[0])
    with pytest.raises(ValueError, match="base model mismatch"):
        L.apply_carrier_bank(model, carriers[1:2])
    L.unmerge_carrier_(model, carriers[0])
    L.apply_carrier_bank(model, carriers[1:2]).restore()


def test_patched_projections_follow_a_changed_bank(carriers):
    """A projection caches its plan between calls; a carrier removed and another added in its
    slot (the same id) must be what the next forward serves."""
    ids, mask = _batch()
    model = _base()
    bank = L.apply_carrier_bank(model, [carriers[0]])
    with torch.no_grad(), bank.carriers([0] * 4):
        first = model(input_ids=ids, attention_mask=mask).logits
    bank.remove(0)
    assert bank.add(carriers[1]) == 0
    with torch.no_grad(), bank.carriers([0] * 4):
        second = model(input_ids=ids, attention_mask=mask).logits
    fresh = _base()
    fresh_bank = L.apply_carrier_bank(fresh, [carriers[1]])
    with torch.no_grad(), fresh_bank.carriers([0] * 4):
        want = fresh(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(second, want)
    assert not torch.allclose(first, second)
