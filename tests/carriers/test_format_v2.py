"""Carrier format 2: dense parts (the non-projection parameters SFT changed) through save -> load,
per-tensor SHA-256 verified at load, version-1 files still load."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lcdd_kernels as L
from lcdd_kernels.carriers.layout import CONFIG_NAME, FORMAT_VERSION, THETA_NAME, WEIGHTS_NAME, tensor_sha256
from lcdd_kernels.carriers.files import read_header
from lcdd_kernels.models.families import Dims
from lcdd_kernels.models.tiny import TINY, tiny_model

from tests.helpers.sft_pairs import sft_pair

V1 = Path(__file__).parent / "data" / "carrier_v1"


def _carrier(family="qwen2", dtype=torch.float32, include_theta=True):
    sft, base = sft_pair(family, dtype)
    theta = torch.randn(Dims.from_config(sft).num_masks, generator=torch.Generator().manual_seed(0))
    handle = L.apply_lcdd(sft, base, theta=theta)
    return sft, base, handle, L.extract_carrier(handle, include_theta=include_theta)


@pytest.mark.parametrize("family", list(TINY))
def test_dense_parts_round_trip(family, tmp_path):
    _, _, handle, c = _carrier(family)
    # the SFT pair moved every norm (and qwen2's q/k/v biases), not the embeddings or lm_head
    assert set(c.dense) == set(handle.differences)
    assert c.dense and all("norm" in n or n.endswith("_proj.bias") for n in c.dense)
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in c.dense
    if family == "qwen3":
        assert "model.layers.1.self_attn.k_norm.weight" in c.dense
    c.save(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    assert cfg["format_version"] == FORMAT_VERSION == 2
    assert cfg["dense_parameters"] == {n: {"shape": list(t.shape), "dtype": "float32"} for n, t in c.dense.items()}
    stored = load_file(str(tmp_path / "c" / WEIGHTS_NAME))
    assert set(cfg["tensor_sha256"]) == set(stored)
    assert all(cfg["tensor_sha256"][k] == tensor_sha256(t) for k, t in stored.items())
    assert "model.norm.weight.carrier_dense" in stored
    loaded = L.load_carrier(tmp_path / "c")
    assert list(loaded.dense) == list(c.dense)
    assert all(torch.equal(loaded.dense[n], c.dense[n]) for n in c.dense)
    assert loaded.num_parameters()["dense"] == sum(t.numel() for t in c.dense.values()) > 0
    assert loaded.nbytes()["dense"] == sum(t.numel() * 4 for t in c.dense.values())


def test_v1_file_still_loads_and_says_so(caplog):
    """tests/carriers/data/carrier_v1 was written by the format-1 code (llama, float16, θ)."""
    with caplog.at_level(logging.WARNING, logger="lcdd_kernels.carriers"):
        c = L.load_carrier(V1)
    assert json.loads((V1 / CONFIG_NAME).read_text())["format_version"] == 1
    assert c.dense == {} and c.theta is not None and c.dtype == torch.float16
    assert sum("format-1 carrier" in r.getMessage() for r in caplog.records) == 1
    # it still reproduces the strict-mode LCDD model it was extracted from
    sft, base = tiny_model("llama", seed=1, dtype=torch.float16), tiny_model("llama", seed=0, dtype=torch.float16)
    handle = L.apply_lcdd(sft, base, theta=c.theta, non_projection="base")
    again = L.extract_carrier(handle)
    for p, m in c.modules.items():
        assert torch.equal(m.rows, again.modules[p].rows) and torch.equal(m.delta, again.modules[p].delta)


def test_v1_resaved_becomes_v2(tmp_path):
    old = L.load_carrier(V1)
    old.save(tmp_path / "c")
    assert json.loads((tmp_path / "c" / CONFIG_NAME).read_text())["format_version"] == 2
    new = L.load_carrier(tmp_path / "c")
    assert new.dense == {} and new.dtype == old.dtype and torch.equal(new.theta, old.theta)
    assert new.modules.keys() == old.modules.keys()
    assert all(torch.equal(getattr(new.modules[p], t), getattr(m, t))
               for p, m in old.modules.items() for t in ("rows", "cols", "delta"))


def _flip_bit(path: Path, key: str, byte: int = 0, bit: int = 0):
    """Flip one bit inside tensor ``key``'s data, leaving the header intact."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header[key]["data_offsets"][0]
    raw[start + byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("v2") / "c"
    _carrier("qwen2")[3].save(d)
    return d


def _copy(saved, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(saved, d)
    return d


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.carrier_delta",
                                 "model.layers.1.self_attn.v_proj.bias.carrier_dense",
                                 "model.norm.weight.carrier_dense"])
def test_a_flipped_bit_is_refused_naming_the_tensor(saved, tmp_path, key):
    d = _copy(saved, tmp_path)
    _flip_bit(d / WEIGHTS_NAME, key, byte=1, bit=3)  # a mantissa bit: still a finite number
    with pytest.raises(ValueError, match=rf"tensor {key} does not match its SHA-256"):
        L.load_carrier(d)


def test_a_flipped_theta_bit_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _flip_bit(d / THETA_NAME, "theta", byte=0, bit=0)
    with pytest.raises(ValueError, match="theta does not match theta_sha256"):
        L.load_carrier(d)


def test_non_finite_dense_part_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    raw = bytearray((d / WEIGHTS_NAME).read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n + json.loads(raw[8:8 + n])["model.norm.weight.carrier_dense"]["data_offsets"][0]
    raw[start:start + 4] = torch.tensor([float("inf")]).numpy().tobytes()
    (d / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"carrier.safetensors: dense part 'model.norm.weight': holds NaN or inf"):
        L.load_carrier(d)


def test_header_is_read_without_the_data(saved, monkeypatch):
    from lcdd_kernels.carriers import files

    reads = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            out = self.f.read(n)
            reads.append(len(out))
            return out

    monkeypatch.setattr(files, "open", lambda *a, **k: Counting(open(*a, **k)), raising=False)
    path = saved / WEIGHTS_NAME
    header = read_header(path)
    assert header["model.norm.weight.carrier_dense"] == (torch.float32, (48,))
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert sum(reads) == 8 + n < path.stat().st_size  # the 8-byte length and the header, none of the data
