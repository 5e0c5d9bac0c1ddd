"""carrier_channels from carriers and handles; trigger files (save, load, refusals)."""

import json

import pytest
import torch

from lcdd_kernels.carriers.apply import apply_carrier
from lcdd_kernels.carriers.extract import extract_carrier
from lcdd_kernels.eraser.capture import carrier_channels
from lcdd_kernels.eraser.eraser import EraserOptions, EraserResult
from lcdd_kernels.eraser.trigger_file import load_trigger, model_fingerprint, save_trigger, trigger_metadata
from lcdd_kernels.models.patch import apply_lcdd
from lcdd_kernels.models.tiny import tiny_model


@pytest.fixture(scope="module")
def lcdd():
    """An apply_lcdd handle with about half the mask entries on, and its carrier."""
    model, base = tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=0)
    handle = apply_lcdd(model, base, seed=0, init_mean=0.0, init_std=1.0)
    return handle, extract_carrier(handle), base


def _by_hand(handle, groups):
    theta = handle.flat_theta()
    per = handle.dims.masks_per_layer
    out = {}
    for layer, mask in enumerate(handle.masks):
        t = theta[layer * per:(layer + 1) * per]
        on = [torch.nonzero(t[slice(*mask.range(g))] > 0).flatten() for g in groups]
        idx = torch.unique(torch.cat(on))
        if idx.numel():
            out[layer] = idx
    return out


@pytest.mark.parametrize("kind, groups", [
    ("write", ("ffn_write", "attn_write")),
    ("all_residual", ("ffn_write", "attn_write", "ffn_read", "attn_read")),
    ("ffn_write", ("ffn_write",)),
    ("attn_write", ("attn_write",)),
])
def test_carrier_channels(lcdd, kind, groups):
    handle, carrier, base = lcdd
    ref = _by_hand(handle, groups)
    assert ref, "the fixture should have active channels"
    for source in (handle, carrier):
        got = carrier_channels(source, kind=kind)
        assert got.keys() == ref.keys()
        for layer in ref:
            assert torch.equal(got[layer], ref[layer])
    applied = apply_carrier(tiny_model("qwen3", seed=0), carrier)
    got = carrier_channels(applied, kind)
    assert got.keys() == ref.keys() and all(torch.equal(got[layer], ref[layer]) for layer in ref)


def test_carrier_channels_bad_input(lcdd):
    with pytest.raises(ValueError, match="kind must be one of"):
        carrier_channels(lcdd[1], kind="reads")
    with pytest.raises(TypeError, match="expected a Carrier"):
        carrier_channels({0: [1]})


def _result(model, n=3):
    return EraserResult(trigger=torch.randn(n, model.config.hidden_size), best_loss=0.5, best_step=2,
                        curves={"loss": [1.0, 0.7, 0.5], "mse": [0.0] * 3, "kl": [0.0] * 3, "l2": [0.0] * 3},
                        channels={0: torch.tensor([1, 4])}, channels_kind="write", options=EraserOptions(steps=3))


def test_trigger_roundtrip_and_refusals(tmp_path, lcdd):
    _, carrier, _ = lcdd
    model = tiny_model("qwen3", seed=0)
    handle = apply_carrier(model, carrier)
    res = _result(model)
    save_trigger(tmp_path / "t", res, model)
    assert torch.equal(load_trigger(tmp_path / "t", model), res.trigger)
    meta = trigger_metadata(tmp_path / "t")
    assert meta["channels_kind"] == "write" and meta["options"]["steps"] == 3 and meta["best_step"] == 2
    with pytest.raises(FileExistsError, match="already holds a trigger"):
        save_trigger(tmp_path / "t", res, model)
    # the base model alone (carrier off), another model, another width: refused
    handle.enable(False)
    with pytest.raises(ValueError, match="optimised for another model"):
        load_trigger(tmp_path / "t", model)
    handle.enable(True)
    assert model_fingerprint(model) == meta["model_fingerprint"]
    with pytest.raises(ValueError, match="optimised for another model"):
        load_trigger(tmp_path / "t", tiny_model("qwen3", seed=5))
    assert load_trigger(tmp_path / "t", tiny_model("qwen3", seed=5), allow_fingerprint_mismatch=True).shape == (3, 48)
    with pytest.raises(ValueError, match="hidden size 48"):
        load_trigger(tmp_path / "t", tiny_model("qwen3", hidden_size=36, head_dim=6),
                     allow_fingerprint_mismatch=True)
    # corrupt files
    (tmp_path / "t" / "trigger.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_trigger(tmp_path / "t")
    (tmp_path / "t" / "trigger.json").write_text(json.dumps(meta))
    (tmp_path / "t" / "trigger.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_trigger(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="no trigger.json"):
        load_trigger(tmp_path / "missing")
