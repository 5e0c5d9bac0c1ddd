"""Carriers (SPEC §4): extract -> save -> load -> apply to the base equals the LCDD model with binary
masks; every damaged or mismatched file is refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lcdd_kernels as L
from lcdd_kernels.carriers.extract import fingerprint_tensors
from lcdd_kernels.carriers.layout import CONFIG_NAME, THETA_NAME, WEIGHTS_NAME
from lcdd_kernels.models.families import Dims
from lcdd_kernels.models.tiny import TINY, tiny_model

from tests.helpers.compare import assert_close


def _lcdd(family="llama", dtype=torch.float64, seed=0, non_projection="base"):
    sft, base = tiny_model(family, seed=1, dtype=dtype), tiny_model(family, seed=0, dtype=dtype)
    n = Dims.from_config(sft).num_masks
    theta = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return sft, base, L.apply_lcdd(sft, base, theta=theta, non_projection=non_projection)


def _ids():
    return torch.randint(3, 90, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid carrier directory (llama, float32) and the LCDD logits it must reproduce."""
    sft, base, handle = _lcdd(dtype=torch.float32)
    d = tmp_path_factory.mktemp("carrier") / "c"
    L.extract_carrier(handle).save(d)
    return d


def _copy(saved, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME, THETA_NAME):
        (d / name).write_bytes((saved / name).read_bytes())
    return d


@pytest.mark.parametrize("non_projection", ["base", "sft"])
@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_save_load_apply_equals_lcdd_model(family, dtype, non_projection, tmp_path):
    # the tiny SFT and base models differ in their embeddings and lm_head too: in "sft" mode the
    # carrier carries them as dense parts
    sft, base, handle = _lcdd(family, dtype, non_projection=non_projection)
    sft.eval()
    ids = _ids()
    want = sft(input_ids=ids).logits.detach()
    base_logits = base(input_ids=ids).logits.detach()
    carrier = L.extract_carrier(handle)
    carrier.save(tmp_path / "c")
    loaded = L.load_carrier(tmp_path / "c")

    assert list(loaded.modules) == list(carrier.modules) == list(handle.modules)
    for path, m in carrier.modules.items():
        assert torch.equal(loaded.modules[path].rows, m.rows) and torch.equal(loaded.modules[path].delta, m.delta)
    assert torch.equal(loaded.theta, handle.flat_theta())
    assert len(loaded.active_channels()) == len(handle.active_channels())
    for a, b in zip(loaded.active_channels(), handle.active_channels()):
        assert a.keys() == b.keys() and all(torch.equal(a[g], b[g]) for g in a)

    fresh_base = tiny_model(family, seed=0, dtype=dtype)
    ch = L.apply_carrier(fresh_base, loaded)
    ref64 = want.double()
    assert_close("carrier on == LCDD", fresh_base(input_ids=ids).logits.detach(), ref64,
                 lowp=want if dtype != torch.float64 else None, dtype=dtype)
    ch.enable(False)
    assert torch.equal(fresh_base(input_ids=ids).logits.detach(), base_logits)
    ch.enable(True)
    model = ch.remove()
    assert all(type(model.get_submodule(p)) is torch.nn.Linear for p in loaded.modules)
    assert torch.equal(model(input_ids=ids).logits.detach(), base_logits)


def test_config_fields_and_sizes(saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    c = L.load_carrier(saved)
    assert cfg["format_version"] == 2 and cfg["carrier_type"] == "lcdd" and cfg["model_type"] == "llama"
    assert cfg["dtype"] == "float32"
    assert cfg["target_modules"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert cfg["base_model"]["fingerprint"].startswith("sha256:")
    stats = c.stats()
    assert cfg["sparsity"]["overall"] == stats["overall"]["sparsity"]
    assert set(cfg["sparsity"]["groups"]) == set(stats["groups"])
    n = c.num_parameters()
    assert n["carrier"] == sum(m.delta.numel() for m in c.modules.values()) and 0 < n["ratio"] < 1
    tensors = load_file(str(saved / WEIGHTS_NAME))
    assert tensors["model.layers.0.self_attn.q_proj.carrier_rows"].dtype == torch.int32
    assert tensors["model.layers.1.mlp.down_proj.carrier_delta"].dim() == 2


def test_saving_never_overwrites_silently(saved, tmp_path):
    d = _copy(saved, tmp_path)
    before = (d / WEIGHTS_NAME).read_bytes()
    c = L.load_carrier(d)
    with pytest.raises(FileExistsError, match="already holds a carrier.*overwrite=True"):
        c.save(d)
    assert (d / WEIGHTS_NAME).read_bytes() == before
    c.theta = None
    c.save(d, overwrite=True)
    assert not (d / THETA_NAME).exists()  # a stale θ must not survive an overwrite
    assert L.load_carrier(d).theta is None


def test_fingerprint_mismatch_and_override(saved):
    c = L.load_carrier(saved)
    other = tiny_model("llama", seed=5)
    with pytest.raises(ValueError, match=r"fingerprint sha256:\w+ .* fingerprint sha256:\w+.*allow_fingerprint_mismatch=True"):
        L.apply_carrier(other, c)
    assert all(type(other.get_submodule(p)) is torch.nn.Linear for p in c.modules)  # untouched
    L.apply_carrier(other, c, allow_fingerprint_mismatch=True).remove()
    with pytest.raises(ValueError, match="carrier is for a llama model but this is a qwen3"):
        L.apply_carrier(tiny_model("qwen3"), c)
    with pytest.raises(ValueError, match="carrier is for dims"):
        L.apply_carrier(tiny_model("llama", intermediate_size=64), c, allow_fingerprint_mismatch=True)


def test_fingerprint_streams_and_ignores_storage_dtype():
    w = torch.randn(300, 70).to(torch.bfloat16)
    assert fingerprint_tensors([("a", w)]) == fingerprint_tensors([("a", w.float())])
    assert fingerprint_tensors([("a", w)]) != fingerprint_tensors([("b", w)])
    w2 = w.clone()
    w2[299, 69] += 1
    assert fingerprint_tensors([("a", w)]) != fingerprint_tensors([("a", w2)])
    assert fingerprint_tensors([("a", w)]) != fingerprint_tensors([("a", w.reshape(70, 300))])
    base = tiny_model("qwen2", seed=0)
    _, _, handle = _lcdd("qwen2", torch.float32)
    assert L.base_fingerprint(base) == L.base_fingerprint(handle) == L.base_fingerprint(handle.model)


def test_apply_refuses_patched_model(saved):
    c = L.load_carrier(saved)
    sft, base, handle = _lcdd(dtype=torch.float32)
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        L.apply_carrier(sft, c)
    ch = L.apply_carrier(base, c)
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        L.apply_carrier(base, c)
    ch.remove()


# --------------------------------------------------------------------------- damaged files


def _edit_tensors(d, fn):
    t = load_file(str(d / WEIGHTS_NAME))
    fn(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / WEIGHTS_NAME))


def _edit_config(d, fn):
    cfg = json.loads((d / CONFIG_NAME).read_text())
    fn(cfg)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


Q = "model.layers.0.self_attn.q_proj"


def _swap_first_two(t, key):
    x = t[key].clone()
    x[[0, 1]] = x[[1, 0]]
    t[key] = x


BAD = {
    "truncated safetensors": (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-100]),
                              ValueError, "corrupt or truncated"),
    "garbage safetensors": (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x00" * 64), ValueError, "corrupt or truncated"),
    "corrupt json": (lambda d: (d / CONFIG_NAME).write_text("{not json"), ValueError, "corrupt"),
    "missing weights file": (lambda d: (d / WEIGHTS_NAME).unlink(), FileNotFoundError, "is missing"),
    "missing config": (lambda d: (d / CONFIG_NAME).unlink(), FileNotFoundError, "not a carrier directory"),
    "missing key": (lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q}.carrier_cols")), ValueError,
                    r"missing \['model.layers.0.self_attn.q_proj.carrier_cols'\]"),
    "extra key": (lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.9.mlp.up_proj.carrier_rows":
                                                                 torch.zeros(1, dtype=torch.int32)})),
                  ValueError, "unexpected .*layers.9"),
    "unsorted rows": (lambda d: _edit_tensors(d, lambda t: _swap_first_two(t, f"{Q}.carrier_rows")),
                      ValueError, "carrier_rows must be sorted and unique"),
    "out-of-range cols": (lambda d: _edit_tensors(d, lambda t: t[f"{Q}.carrier_cols"].__setitem__(-1, 4800)),
                          ValueError, r"carrier_cols holds indices out of range \[0, 48\)"),
    "int64 rows": (lambda d: _edit_tensors(d, lambda t: t.update({f"{Q}.carrier_rows": t[f"{Q}.carrier_rows"].long()})),
                   ValueError, "must be int32"),
    "delta shape": (lambda d: _edit_tensors(d, lambda t: t.update({f"{Q}.carrier_delta": t[f"{Q}.carrier_delta"][:, 1:]})),
                    ValueError, r"carrier_delta has shape .* expected \(\|rows\|, \|cols\|\)"),
    "delta dtype": (lambda d: _edit_tensors(d, lambda t: t.update({f"{Q}.carrier_delta": t[f"{Q}.carrier_delta"].half()})),
                    ValueError, "carrier_delta has dtype torch.float16"),
    "nan delta": (lambda d: _edit_tensors(d, lambda t: t[f"{Q}.carrier_delta"].view(-1).__setitem__(0, float("nan"))),
                  ValueError, "NaN or inf"),
    "inconsistent masks": (lambda d: _edit_tensors(d, lambda t: t.update({
        "model.layers.0.self_attn.k_proj.carrier_cols": t["model.layers.0.self_attn.k_proj.carrier_cols"][1:],
        "model.layers.0.self_attn.k_proj.carrier_delta": t["model.layers.0.self_attn.k_proj.carrier_delta"][:, 1:]})),
        ValueError, "disagree with the 'attn_read' mask"),
    "newer format": (lambda d: _edit_config(d, lambda c: c.update(format_version=99)), ValueError, "newer lcdd-kernels"),
    "wrong carrier type": (lambda d: _edit_config(d, lambda c: c.update(carrier_type="lora")), ValueError,
                           "carrier_type is 'lora'"),
    "unsupported model": (lambda d: _edit_config(d, lambda c: c.update(model_type="gpt2")), ValueError,
                          "unsupported model family 'gpt2'"),
    "missing field": (lambda d: _edit_config(d, lambda c: c.pop("dims")), ValueError, "missing field 'dims'"),
    "bad dims": (lambda d: _edit_config(d, lambda c: c["dims"].update(hidden_size=-1)), ValueError, "positive integers"),
    "dims vs tensors": (lambda d: _edit_config(d, lambda c: (c["dims"].update(intermediate_size=81),
                                                             c["module_shapes"]["mlp.gate_proj"].__setitem__(0, 81),
                                                             c["module_shapes"]["mlp.up_proj"].__setitem__(0, 81),
                                                             c["module_shapes"]["mlp.down_proj"].__setitem__(1, 81))),
                        ValueError, "theta has shape"),
    "counts from another carrier": (lambda d: _edit_config(d, lambda c: c["active"].update(overall=1)), ValueError,
                                    "come from different carriers"),
    "bad dtype": (lambda d: _edit_config(d, lambda c: c.update(dtype="int8")), ValueError, "dtype 'int8'"),
    "theta of another carrier": (lambda d: save_file({"theta": -load_file(str(d / THETA_NAME))["theta"]},
                                                      str(d / THETA_NAME)), ValueError, "theta belongs to another"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_damaged_carrier_is_refused(case, saved, tmp_path):
    damage, exc, pattern = BAD[case]
    d = _copy(saved, tmp_path)
    damage(d)
    with pytest.raises(exc, match=pattern):
        L.load_carrier(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        L.load_carrier(tmp_path / "nope")
