"""Signed carriers (model-signing, EC keys, offline): a signed carrier verifies; an unsigned one, one
signed with another key, one changed after signing (a forgery with recomputed format-2 hashes
included) and one with a damaged signature are refused naming the reason, by load_carrier, the
CLI's --verify and apply_carrier_bank(verify=)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.carriers.layout import CONFIG_NAME, WEIGHTS_NAME, tensor_sha256
from lcdd_kernels.carriers.signing import SIGNATURE_NAME, CarrierSignatureError
from lcdd_kernels.cli import main
from lcdd_kernels.models.families import Dims

from tests.helpers.sft_pairs import sft_pair

pytest.importorskip("model_signing", reason="signing needs the `sign` extra (model-signing)")


def _key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {"maker": _key_pair(d, "maker"), "other": _key_pair(d, "other")}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    sft, base = sft_pair("qwen2", torch.float32)
    theta = torch.randn(Dims.from_config(sft).num_masks, generator=torch.Generator().manual_seed(0))
    carrier = L.extract_carrier(L.apply_lcdd(sft, base, theta=theta))
    d = tmp_path_factory.mktemp("signed") / "carrier"
    carrier.save(d)
    sig = L.sign_carrier(d, keys["maker"][0])
    assert sig == d.resolve() / SIGNATURE_NAME and sig.is_file()
    return d, carrier


def _copy(signed, tmp_path) -> Path:
    d = tmp_path / "c"
    shutil.copytree(signed[0], d)
    return d


def _same(a, b) -> bool:
    return a.modules.keys() == b.modules.keys() and all(
        torch.equal(getattr(a.modules[p], f), getattr(b.modules[p], f))
        for p in a.modules for f in ("rows", "cols", "delta"))


def test_signed_carrier_verifies_and_loads(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)  # a copy elsewhere (another directory name) still verifies
    L.verify_carrier(d, keys["maker"][1])
    assert _same(L.load_carrier(d, verify=keys["maker"][1]), signed[1])
    assert _same(L.load_carrier(d), signed[1])  # without verify, as before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_unsigned_is_refused(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    (d / SIGNATURE_NAME).unlink()
    with pytest.raises(CarrierSignatureError, match="is not signed"):
        L.load_carrier(d, verify=keys["maker"][1])
    L.load_carrier(d)


def test_another_key_is_refused(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    with pytest.raises(CarrierSignatureError, match="signed with another key"):
        L.load_carrier(d, verify=keys["other"][1])
    # re-signed by someone else: the maker's key refuses it
    L.sign_carrier(d, keys["other"][0])
    L.verify_carrier(d, keys["other"][1])
    with pytest.raises(CarrierSignatureError, match="signed with another key"):
        L.load_carrier(d, verify=keys["maker"][1])


def test_forgery_with_recomputed_hashes_is_refused(signed, keys, tmp_path):
    """An edited delta with its format-2 hash rewritten loads without verify (the hashes catch damage,
    not intent); with verify it is refused, naming the changed files."""
    from safetensors.torch import load_file, save_file

    d = _copy(signed, tmp_path)
    tensors = load_file(str(d / WEIGHTS_NAME))
    key = next(k for k in tensors if k.endswith(".carrier_delta"))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["tensor_sha256"][key] = tensor_sha256(tensors[key])
    (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    forged = L.load_carrier(d)
    path = key[:-len(".carrier_delta")]
    assert torch.equal(forged.modules[path].delta, signed[1].modules[path].delta + 1.0)
    with pytest.raises(CarrierSignatureError, match=r"content differs.*changed: .*carrier.safetensors") as e:
        L.load_carrier(d, verify=keys["maker"][1])
    assert CONFIG_NAME in str(e.value)


def test_added_file_and_damaged_signature_are_refused(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    (d / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CarrierSignatureError, match="added: extra.safetensors"):
        L.verify_carrier(d, keys["maker"][1])
    (d / "extra.safetensors").unlink()
    raw = json.loads((d / SIGNATURE_NAME).read_text())
    env = raw["dsseEnvelope"]["signatures"][0]
    env["sig"] = env["sig"][:8] + ("A" if env["sig"][8] != "A" else "B") + env["sig"][9:]
    (d / SIGNATURE_NAME).write_text(json.dumps(raw))
    with pytest.raises(CarrierSignatureError, match="invalid or damaged"):
        L.verify_carrier(d, keys["maker"][1])
    (d / SIGNATURE_NAME).write_text("not json")
    with pytest.raises(CarrierSignatureError, match="invalid or damaged"):
        L.verify_carrier(d, keys["maker"][1])


def test_key_errors_name_the_fix(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    with pytest.raises(FileNotFoundError, match="public key .* does not exist"):
        L.load_carrier(d, verify=tmp_path / "nope.pem")
    with pytest.raises(ValueError, match="pass the PUBLIC key"):
        L.load_carrier(d, verify=keys["maker"][0])
    with pytest.raises(ValueError, match="not a usable elliptic-curve private key"):
        L.sign_carrier(d, keys["maker"][1])
    with pytest.raises(FileNotFoundError, match="no carrier_config.json"):
        L.sign_carrier(tmp_path, keys["maker"][0])


def test_resave_drops_the_old_signature(signed, keys, tmp_path):
    d = _copy(signed, tmp_path)
    (d / "README.md").write_text("notes")
    signed[1].save(d, overwrite=True)
    assert not (d / SIGNATURE_NAME).exists() and (d / "README.md").read_text() == "notes"
    with pytest.raises(CarrierSignatureError, match="is not signed"):
        L.load_carrier(d, verify=keys["maker"][1])
    L.sign_carrier(d, keys["maker"][0])  # the README is signed with it
    L.verify_carrier(d, keys["maker"][1])


def test_cli_sign_and_verify(signed, keys, tmp_path, capsys):
    d = _copy(signed, tmp_path)
    (d / SIGNATURE_NAME).unlink()
    assert main(["inspect", str(d), "--verify", str(keys["maker"][1])]) == 2
    assert "is not signed" in capsys.readouterr().err
    assert main(["sign", str(d), "--key", str(keys["maker"][0])]) == 0
    assert SIGNATURE_NAME in capsys.readouterr().out
    assert main(["inspect", str(d), "--verify", str(keys["maker"][1])]) == 0
    assert "delta entries" in capsys.readouterr().out
    assert main(["export", str(d), "--to", "peft-lora", "--out", str(tmp_path / "peft"), "--verify",
                 str(keys["other"][1])]) == 2
    assert "signed with another key" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()
    assert main(["eval", "--tiny", "qwen2", "--verify", str(keys["maker"][1])]) == 2
    assert "--verify checks the signature of --carrier" in capsys.readouterr().err


def test_bank_requires_signatures_when_told(signed, keys, tmp_path):
    from lcdd_kernels.models.tiny import tiny_model

    d = _copy(signed, tmp_path)
    model = tiny_model("qwen2", seed=0)
    bank = L.apply_carrier_bank(model, {"maker": d}, verify=keys["maker"][1])
    assert bank is not None
    bank.restore()
    with pytest.raises(TypeError, match="pass their paths"):
        L.apply_carrier_bank(model, [signed[1]], verify=keys["maker"][1])
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(CarrierSignatureError, match="another key"):
        L.apply_carrier_bank(model, [d], verify=keys["other"][1])
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing patched


def test_adapter_sizes_bench_verifies_when_told(signed, keys, tmp_path):
    from lcdd_kernels.bench.adapter_sizes import real

    d, carrier = signed
    row = real(str(d), verify=keys["maker"][1])
    assert row["model"] == carrier.family
    with pytest.raises(CarrierSignatureError, match="another key|not made with|signature"):
        real(str(d), verify=keys["other"][1])


def test_a_file_swapped_after_the_check_is_caught(signed, keys, tmp_path, monkeypatch):
    """Between the signature check and the read, a consistent forgery replaces the weights and the
    config inside the directory (its inode stays): the load must not return the forged delta."""
    from safetensors.torch import load_file, save_file

    import lcdd_kernels.carriers.load as load_mod

    d = _copy(signed, tmp_path)
    real_verify = load_mod.verify_carrier

    def verify_then_swap(directory, public_key):
        real_verify(directory, public_key)
        tensors = load_file(str(d / WEIGHTS_NAME))
        key = next(k for k in sorted(tensors) if k.endswith(".carrier_delta"))
        tensors[key] = tensors[key] + 1.0
        save_file(tensors, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = json.loads((d / CONFIG_NAME).read_text())
        cfg["tensor_sha256"][key] = tensor_sha256(tensors[key])
        (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))

    monkeypatch.setattr(load_mod, "verify_carrier", verify_then_swap)
    with pytest.raises(CarrierSignatureError, match="content differs"):
        L.load_carrier(d, verify=keys["maker"][1])
