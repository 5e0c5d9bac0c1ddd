"""A carrier directory that is damaged or hostile is refused quickly, with
an error naming the file and the field or tensor -- never a bare TypeError, RecursionError,
Python's digit-limit error, a false index error, or gigabytes of memory."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import lcdd_kernels as L
from lcdd_kernels import _checks
from lcdd_kernels.carriers.layout import CONFIG_NAME, THETA_NAME, WEIGHTS_NAME, tensor_sha256
from lcdd_kernels.models.families import Dims
from lcdd_kernels.models.tiny import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    sft, base = tiny_model("llama", seed=1), tiny_model("llama", seed=0)
    theta = torch.randn(Dims.from_config(sft).num_masks, generator=torch.Generator().manual_seed(0))
    d = tmp_path_factory.mktemp("r") / "c"
    L.extract_carrier(L.apply_lcdd(sft, base, theta=theta, non_projection="base")).save(d)
    return d


def _edit(saved, tmp_path, fn=None, text=None):
    d = tmp_path / "c"
    shutil.copytree(saved, d)
    if text is not None:
        (d / CONFIG_NAME).write_text(text)
    else:
        cfg = json.loads((d / CONFIG_NAME).read_text())
        fn(cfg)
        (d / CONFIG_NAME).write_text(json.dumps(cfg))
    return d


def _refused(d, pattern):
    with pytest.raises(ValueError, match=pattern) as e:
        L.load_carrier(d)
    assert str(d) in str(e.value), f"the error does not name the file: {e.value}"


@pytest.mark.parametrize("value", ["a string", [1, 2], 3, 2.5, True])
def test_metadata_must_be_an_object(saved, tmp_path, value):
    _refused(_edit(saved, tmp_path, lambda c: c.update(metadata=value)), "field 'metadata' must be a JSON object")


def test_deep_json(saved, tmp_path):
    _refused(_edit(saved, tmp_path, text="[" * 100_000 + "]" * 100_000), "nested too deeply")


def test_huge_integer_literal(saved, tmp_path):
    text = (saved / CONFIG_NAME).read_text().replace('"format_version": 2', '"format_version": ' + "9" * 5000)
    _refused(_edit(saved, tmp_path, text=text), "out of range")


@pytest.mark.parametrize("layers", [10**6, 2 * 10**9, 10**12])
def test_one_config_field_cannot_exhaust_memory(saved, tmp_path, layers):
    """Before: 10**6 layers cost 5 GiB and 75 s before a "keys mismatch" error."""
    d = _edit(saved, tmp_path, lambda c: c["dims"].update(num_layers=layers))
    t0 = time.perf_counter()
    _refused(d, "at most 2147483647" if layers >= 2**31 else rf"says {layers} layers but this file holds tensors of 2")
    assert time.perf_counter() - t0 < 2.0


def test_huge_dims_are_bounded(saved, tmp_path):
    _refused(_edit(saved, tmp_path, lambda c: c["dims"].update(hidden_size=10**15)), "at most 2147483647")


@pytest.mark.parametrize("field,value,pattern", [
    ("sparsity", {"overall": 0.5}, "sparsity must be"),
    ("sparsity", "x", "field 'sparsity' must be a dict"),
    ("num_parameters", {"carrier": 1, "projections": 2, "ratio": 0.5, "dense": 0}, "num_parameters .* does not match"),
    ("num_parameters", {"carrier": "1"}, "num_parameters must hold"),
    ("lcdd_kernels_version", 5, "must be a version string"),
    ("lcdd_kernels_version", "x" * 300, "must be a version string"),
    ("format_version", "2", "field 'format_version' must be a int"),
    ("format_version", 0, "format_version 0 is invalid"),
])
def test_summary_and_version_fields(saved, tmp_path, field, value, pattern):
    _refused(_edit(saved, tmp_path, lambda c: c.update({field: value})), pattern)


def test_sparsity_must_follow_from_the_tensors(saved, tmp_path):
    def fn(c):
        c["sparsity"]["overall"] = 0.01
    _refused(_edit(saved, tmp_path, fn), "does not follow from the tensors")
    ratio = tmp_path / "r"
    ratio.mkdir()
    _refused(_edit(saved, ratio, lambda c: c["num_parameters"].update(ratio=0.9)), "num_parameters")


def _retheta(saved, tmp_path, theta):
    d = tmp_path / "c"
    shutil.copytree(saved, d)
    save_file({"theta": theta}, str(d / THETA_NAME))
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["theta_sha256"] = tensor_sha256(theta)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    return d


def test_theta_dtype_and_nan(saved, tmp_path):
    theta = load_file(str(saved / THETA_NAME))["theta"]
    _refused(_retheta(saved, tmp_path, theta > 0), "theta must hold floating-point mask logits")
    nan = theta.clone()
    nan[theta < 0] = float("nan")  # NaN > 0 is False: the active set would still match
    d2 = tmp_path / "n"
    d2.mkdir()
    _refused(_retheta(saved, d2, nan), "theta holds NaN or inf")


def test_in_memory_theta_checks(saved):
    c = L.load_carrier(saved)
    with pytest.raises(ValueError, match="floating-point"):
        L.Carrier(c.modules, c.family, c.dims, c.dtype, c.base_fingerprint, theta=c.theta > 0)
    with pytest.raises(ValueError, match="metadata must be a dict"):
        L.Carrier(c.modules, c.family, c.dims, c.dtype, c.base_fingerprint, metadata="x")


def test_header_claims_more_than_the_file(saved, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(saved, d)
    raw = bytearray((d / WEIGHTS_NAME).read_bytes())
    raw[:8] = (2**40).to_bytes(8, "little")
    (d / WEIGHTS_NAME).write_bytes(bytes(raw))
    _refused(d, "corrupt or truncated .*header claims")


def test_index_check_does_not_wrap_int32():
    ix = torch.tensor([1, 47], dtype=torch.int32)
    _checks.index_tensor("op", "ix", ix, 60_000_000_000, ix.device)  # no false "out of range"
    with pytest.raises(ValueError, match=r"out of range \[0, 60000000000\): min -1"):
        _checks.index_tensor("op", "ix", torch.tensor([-1, 3], dtype=torch.int32), 60_000_000_000, ix.device)
    with pytest.raises(ValueError, match=r"out of range \[0, 40\): min 1, max 47"):
        _checks.index_tensor("op", "ix", ix, 40, ix.device)
